"""POST /debug/route (admin): explain where a request would go, without sending it."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.api.admin import require_admin
from gateway.api.openai import parse_json_object, read_body, routing_request_from
from gateway.kvindex.service import PrefixService
from gateway.routing.router import Router
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH


def build_debug_router() -> APIRouter:
    router = APIRouter()

    @router.post("/debug/route")
    async def explain_route(request: Request) -> JSONResponse:
        require_admin(request)
        body = await read_body(request, request.app.state.config.proxy.max_body_bytes)
        data = parse_json_object(body)
        # The body says which API it is for: chat has messages, completions a prompt.
        api_path = request.query_params.get("api") or (CHAT_PATH if "messages" in data else COMPLETIONS_PATH)
        routing_request = routing_request_from(request, data, api_path)
        started = time.perf_counter()
        prefix: PrefixService | None = request.app.state.prefix
        if prefix is not None:
            await prefix.annotate(routing_request)
        router_: Router = request.app.state.router
        decision = router_.evaluate(routing_request)
        # Scorers that estimate something concrete (kv_aware: seconds to first token).
        estimates: dict[str, float] = {}
        candidates = router_.candidates(routing_request)
        for weighted in router_.scorers:
            estimate = getattr(weighted.scorer, "estimates", None)
            if estimate is not None:
                estimates.update(estimate(routing_request, candidates))
        engines: dict[str, Any] = {}
        for engine_id, total in decision.totals.items():
            match = routing_request.prefix_matches.get(engine_id)
            engines[engine_id] = {
                "total_score": total,
                "scores": {name: scores[engine_id] for name, scores in decision.by_scorer.items()},
                "matched_chunks": match.num_chunks if match else 0,
                "matched_chunks_by_tier": dict(match.by_tier) if match else {},
                "predicted_cached_tokens": prefix.predicted_cached_tokens(routing_request, engine_id) if prefix else None,
                "estimated_ttft_s": estimates.get(engine_id),
            }
        return JSONResponse(
            {
                "policy": decision.policy,
                "chosen": decision.endpoint.id,
                "prompt_tokens": routing_request.num_prompt_tokens,
                "num_chunks": len(routing_request.chunk_keys),
                "engines": engines,
                "cost_model": request.app.state.cost_model.describe(),
                "explain_ms": (time.perf_counter() - started) * 1000,
            }
        )

    return router
