"""POST /debug/route (admin): explain where a request would go, without sending it."""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.api.admin import require_admin
from gateway.api.openai import parse_request, read_body, routing_request_from
from gateway.api.validation import parse_json_object
from gateway.generation import current
from gateway.routing.ttft import OPTIONS, TTFTEstimate
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH


def build_debug_router() -> APIRouter:
    router = APIRouter()

    @router.post("/debug/route")
    async def explain_route(request: Request) -> JSONResponse:
        generation = current(request)
        require_admin(request)
        body = await read_body(request, generation.config.proxy.max_body_bytes)
        data = parse_json_object(body)
        # The body says which API it is for: chat has messages, completions a prompt.
        api_path = request.query_params.get("api") or (CHAT_PATH if "messages" in data else COMPLETIONS_PATH)
        data = parse_request(body, api_path, allow_chat_templates=generation.config.proxy.allow_client_chat_templates)
        routing_request = routing_request_from(request, data, api_path)
        started = time.perf_counter()
        prefix = generation.prefix
        router_ = generation.router
        router_.candidates(routing_request)  # unknown model: 404 before tokenizing
        if prefix is not None:
            await prefix.annotate(routing_request)
        decision = router_.evaluate(routing_request)
        # Seconds to first token per engine by each way of serving it (own hit, store load,
        # peer pull, recompute), as kv_aware weighs them (shown whatever the policy).
        estimator = generation.estimator
        candidates = router_.candidates(routing_request)
        estimates = {e.id: estimator.estimate(routing_request, e) for e in candidates}
        engines: dict[str, Any] = {}
        for engine_id, total in decision.totals.items():
            match = routing_request.prefix_matches.get(engine_id)
            engines[engine_id] = {
                "total_score": total,
                "scores": {name: scores[engine_id] for name, scores in decision.by_scorer.items()},
                "matched_chunks": match.num_chunks if match else 0,
                "matched_chunks_by_tier": dict(match.by_tier) if match else {},
                "predicted_cached_tokens": prefix.predicted_cached_tokens(routing_request, engine_id) if prefix else None,
                **_describe_estimate(estimates.get(engine_id)),
            }
        return JSONResponse(
            {
                "policy": decision.policy,
                "chosen": decision.endpoint.id,
                # A model with a prefill/decode split: the engines each part would go to
                # (`chosen` is then what serving unified would take). None: served unified.
                "disaggregation": generation.dispatcher.disaggregation.explain(routing_request),
                "prompt_tokens": routing_request.num_prompt_tokens,
                "num_chunks": len(routing_request.chunk_keys),
                "engines": engines,
                "cost_model": estimator.cost_model.describe(),
                "transfer_model": estimator.transfer_model.describe() if estimator.transfer_enabled else None,
                "store_model": estimator.store_model.describe(),
                "explain_ms": (time.perf_counter() - started) * 1000,
                # With `server.workers` > 1 each worker has its own index, fed by the same
                # events: which one answered tells an operator (or a test) whose view this is.
                "worker_pid": os.getpid(),
            }
        )

    return router


def _describe_estimate(estimate: TTFTEstimate | None) -> dict[str, Any]:
    if estimate is None:
        return {"estimated_ttft_s": None, "chosen_option": None, "options": dict.fromkeys(OPTIONS),
                "store_load": None, "transfer": None}  # fmt: skip
    option, store = estimate.transfer, estimate.store_load
    return {
        "estimated_ttft_s": estimate.best_s,
        # What serving it there would do: the engine's own way, or a peer pull the gateway runs.
        "chosen_option": estimate.chosen,
        "options": estimate.options_s(),  # seconds; None: the engine lacks that option
        "store_load": None if store is None else {
            "cached_tokens": store.cached_tokens,
            "loaded_tokens": store.loaded_tokens,
            "estimated_load_s": store.load_s,
            "estimated_ttft_s": store.ttft_s,
        },
        "transfer": None if option is None else {
            "source": option.source,
            "prefix_tokens": option.prefix_tokens,
            "moved_tokens": option.moved_tokens,
            "estimated_transfer_s": option.transfer_s,
            "estimated_ttft_s": option.ttft_s,
            "chosen": estimate.transfers,
        },
    }  # fmt: skip
