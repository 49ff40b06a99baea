"""Prefill/decode disaggregation: a request's prompt is computed on one engine and its answer
generated on another, which pulls the prompt's KV over NIXL (vLLM's disaggregated-serving flow,
the one gateway.proxy.transfer drives for prefixes; design.md §5).

It applies to chat and completion requests for a model whose fleet has a split: some engine
serving it with `role: prefill` or `role: decode` (engines with `kv_transfer: true`; `both`
engines take either part). Then, before the dispatcher's usual attempts:

1. prefill: the policy's scorers choose among the prefill-capable engines (prefix hits, queue),
   any KV transfer they planned for that engine runs, and the engine gets the request with
   `max_tokens: 1`, not streamed, and `kv_transfer_params: {"do_remote_decode": true}`. Its
   answer carries `kv_transfer_params` naming its NIXL agent and the blocks it keeps;
2. decode: the least loaded decode-capable engine (another one) gets the client's request as
   it came, with those `kv_transfer_params`: it pulls the blocks, decodes, and its response is
   the client's, through the dispatcher like any other (retries, streaming, errors).

A prefill that fails (engine down, error, timeout, no `kv_transfer_params`) costs the client
nothing: the request is served unified, on another engine when this one failed. The client
leaving during the prefill cancels it (its connection closes: the engine aborts).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from engine_adapter.errors import says_engine_dead
from engine_adapter.transfer.nixl import PREFILL_KV_PARAMS
from gateway.config import ProxyConfig
from gateway.endpoints.outlier import FIRST_BYTE_TIMEOUT, OutlierDetector
from gateway.endpoints.registry import Endpoint
from gateway.errors import GatewayError, UpstreamConnectError
from gateway.kvindex.service import PrefixService
from gateway.metrics import GatewayMetrics
from gateway.proxy.feedback import PredictionFeedback
from gateway.proxy.ledger import Attempt, LoadLedger
from gateway.proxy.transfer import KVTransferRunner
from gateway.proxy.upstream import UpstreamClient, UpstreamResponse, open_stream, upstream_headers
from gateway.routing.router import RoutingDecision, Router
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH
from gateway.types import EngineId, RoutingRequest

logger = logging.getLogger(__name__)

PREFILL_ROLES = frozenset({"prefill", "both"})
DECODE_ROLES = frozenset({"decode", "both"})
DECODE_POLICY = "disaggregated_decode"  # the decode engine's routing decision, as metrics label it
# A prefill answer is one token (with logprobs, a few KB): more is not a prefill answer.
_PREFILL_ANSWER_LIMIT = 1 << 20


def can_prefill(endpoint: Endpoint) -> bool:
    return endpoint.kv_transfer and endpoint.role in PREFILL_ROLES


def can_decode(endpoint: Endpoint) -> bool:
    return endpoint.kv_transfer and endpoint.role in DECODE_ROLES


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill engine's request: the client's, for one token, whole, keeping its KV for a
    remote decoder."""
    prefill = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:  # chat: it takes precedence over max_tokens
        prefill["max_completion_tokens"] = 1
    prefill["stream"] = False
    prefill["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    return prefill


def decode_body(body: bytes, kv_transfer_params: dict[str, Any]) -> bytes:
    """The decode engine's request: what would have gone to one engine (`body`, the client's
    with the gateway's usage request), with the prefill engine's `kv_transfer_params`."""
    decode = json.loads(body)
    decode["kv_transfer_params"] = kv_transfer_params
    return json.dumps(decode).encode()


@dataclass(frozen=True, slots=True)
class FirstAttempt:
    """What the dispatcher's first attempt executes instead of routing it itself."""

    decision: RoutingDecision
    body: bytes
    # The engine that computed the prompt: the decode engine pulls its KV. None: the request
    # is served unified on `decision`'s engine (no other engine could decode it).
    prefill_engine: EngineId | None


class PrefillFailed(Exception):
    def __init__(self, reason: str, engine_at_fault: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        # The engine failed (not the request): the unified attempts leave it out.
        self.engine_at_fault = engine_at_fault


class Disaggregation:
    def __init__(
        self,
        router: Router,
        client: UpstreamClient,
        ledger: LoadLedger,
        feedback: PredictionFeedback,
        outlier: OutlierDetector,
        metrics: GatewayMetrics,
        config: ProxyConfig,
        prefix: PrefixService | None = None,
        transfers: KVTransferRunner | None = None,
    ) -> None:
        self._router = router
        self._client = client
        self._ledger = ledger
        self._feedback = feedback
        self._outlier = outlier
        self._metrics = metrics
        self._config = config
        self._prefix = prefix
        self._transfers = transfers
        self._tie_breaker = itertools.count()

    def applies(self, request: RoutingRequest) -> bool:
        """The request's model has a prefill/decode split, and the request can be split."""
        if request.api_path not in (CHAT_PATH, COMPLETIONS_PATH) or request.pinned_engine is not None:
            return False
        body = request.body
        if body.get("n", 1) != 1:  # vLLM's P/D flow is one sequence per request
            return False
        if body.get("prompt_logprobs") or (body.get("echo") and body.get("logprobs") is not None):
            return False  # the prompt's logprobs: the decode engine computes no prompt
        return any(e.role != "both" and request.model in e.models for e in self._router.registry.endpoints)

    def _can_split(self, request: RoutingRequest) -> bool:
        if not self.applies(request):
            return False
        candidates = self._router.registry.candidates(request.model, request.excluded)
        return any(map(can_prefill, candidates)) and any(map(can_decode, candidates))

    def explain(self, request: RoutingRequest) -> dict[str, str | None] | None:
        """The engines `first_attempt` would choose now, committing nothing (/debug/route);
        None: the request would be served unified. A decode of None: unified on the prefill
        engine (no other engine can decode)."""
        if not self._can_split(request):
            return None
        prefill = self._router.evaluate(request, can_prefill).endpoint
        decode = self._decode_engine(request, prefill, rotate=False)
        return {"prefill": prefill.id, "decode": None if decode is None else decode.id}

    async def first_attempt(self, request: RoutingRequest, body: bytes) -> FirstAttempt | None:
        """Run the prefill and return the decode step; None: route unified as usual (no split,
        no engine for a part, or the prefill failed)."""
        if not self._can_split(request):
            return None
        decision = self._router.route(request, can_prefill)
        prefill = decision.endpoint
        decode = self._decode_engine(request, prefill)
        if decode is None:  # the only decode-capable engine is the prefill one: all of it there
            return FirstAttempt(decision, body, None)
        m = self._metrics
        m.routing_decisions.labels(decision.policy, prefill.id).inc()
        m.disaggregated_engine_requests.labels("prefill", prefill.id).inc()
        try:
            params = await self._prefill(request, prefill)
        except PrefillFailed as exc:
            m.disaggregated_requests.labels("prefill_failed").inc()
            logger.warning("request %s: prefill on %s failed (%s); serving it unified",
                           request.request_id, prefill.id, exc.reason)  # fmt: skip
            if exc.engine_at_fault:
                request.excluded.add(prefill.id)
            return None
        except asyncio.CancelledError:  # the client left: the engine aborts what it was sent
            m.disaggregated_requests.labels("cancelled").inc()
            raise
        m.disaggregated_engine_requests.labels("decode", decode.id).inc()
        decision = RoutingDecision(decode, DECODE_POLICY, {decode.id: -decode.load})
        return FirstAttempt(decision, decode_body(body, params), prefill.id)

    def _decode_engine(self, request: RoutingRequest, prefill: Endpoint, rotate: bool = True) -> Endpoint | None:
        """The least loaded decode-capable engine other than `prefill` (ties take turns when
        `rotate`)."""
        decoders = [
            e for e in self._router.registry.candidates(request.model, request.excluded)
            if can_decode(e) and e is not prefill
        ]  # fmt: skip
        if not decoders:
            return None
        least = min(e.load for e in decoders)
        tied = [e for e in decoders if e.load <= least]
        return tied[next(self._tie_breaker) % len(tied)] if rotate and len(tied) > 1 else tied[0]

    async def _prefill(self, request: RoutingRequest, engine: Endpoint) -> dict[str, Any]:
        """The prefill engine's `kv_transfer_params`, or PrefillFailed."""
        attempt = self._ledger.acquire(request, engine)
        try:
            if self._transfers is not None:
                # What the kv_aware scorer estimated for this engine, executed (a prefix it
                # holds elsewhere is pulled first when that was the plan).
                transfer = await self._transfers.prepare(request, engine)
                if transfer is not None:
                    self._ledger.reprice(request, attempt, transfer)
            started = time.perf_counter()
            answer = await self._ask(request, engine)
            elapsed = time.perf_counter() - started
        finally:
            self._ledger.release(attempt)
        return self._accept(request, engine, attempt, answer, elapsed)

    async def _ask(self, request: RoutingRequest, engine: Endpoint) -> tuple[int, bytes]:
        """Send the prefill request; (status, body). A prefill is a time to first token: it gets
        `first_byte_timeout_s`, and ends at once when the engine is found hung (as any wait
        for a first byte)."""
        headers = upstream_headers(request.headers, engine, f"{request.request_id}-prefill")
        headers["accept-encoding"] = "identity"  # the gateway reads this answer itself
        body = json.dumps(prefill_body(request.body)).encode()
        deadline = asyncio.timeout(self._config.first_byte_timeout_s)
        engine.first_byte_waits.add(deadline)
        upstream: UpstreamResponse | None = None
        failure: BaseException | None = None
        try:
            async with deadline:
                upstream = await open_stream(self._client, engine, request.api_path, headers, body)
                content = await _read_limited(upstream, _PREFILL_ANSWER_LIMIT)
        except (TimeoutError, GatewayError) as exc:
            failure = exc
        finally:
            engine.first_byte_waits.discard(deadline)
            if upstream is not None:
                await upstream.aclose()  # unread: the engine aborts the request
        if isinstance(failure, TimeoutError):
            self._metrics.upstream_timeouts.labels(engine.id, "first_byte").inc()
            self._outlier.record_timeout(engine, FIRST_BYTE_TIMEOUT)
            raise PrefillFailed("no answer in time", engine_at_fault=True)
        if isinstance(failure, UpstreamConnectError):
            self._outlier.record_connect_failure(engine)
            raise PrefillFailed(str(failure), engine_at_fault=True)
        if failure is not None:  # failed mid-answer, or the answer is too long
            self._outlier.record_failure(engine)
            raise PrefillFailed(str(failure), engine_at_fault=True)
        assert upstream is not None
        return upstream.status_code, content

    def _accept(
        self, request: RoutingRequest, engine: Endpoint, attempt: Attempt, answer: tuple[int, bytes], elapsed: float
    ) -> dict[str, Any]:
        status, content = answer
        if status >= 500:
            if says_engine_dead(status, content):
                self._outlier.record_engine_dead(engine)
            else:
                self._outlier.record_failure(engine)
            raise PrefillFailed(f"status {status}", engine_at_fault=True)
        if status != 200:
            # The request, not the engine (a 4xx): the unified attempt gets the engine's own answer.
            raise PrefillFailed(f"status {status}: {content[:200]!r}", engine_at_fault=False)
        try:
            data = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            self._outlier.record_failure(engine)
            raise PrefillFailed("invalid JSON", engine_at_fault=True) from None
        params = data.get("kv_transfer_params") if isinstance(data, dict) else None
        if not isinstance(params, dict) or not params.get("remote_engine_id"):
            raise PrefillFailed("no kv_transfer_params in the answer (is NixlConnector on?)", engine_at_fault=False)
        self._outlier.record_success(engine)
        self._metrics.disaggregated_prefill_duration.labels(engine.id).observe(elapsed)
        if self._prefix is not None:
            self._prefix.record_routed(request, engine)
        usage = data.get("usage")
        self._feedback.observe(request, attempt, usage if isinstance(usage, dict) else None, elapsed)
        return params


async def _read_limited(upstream: UpstreamResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise GatewayError(f"the prefill answer is longer than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
