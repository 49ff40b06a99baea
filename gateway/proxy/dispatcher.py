"""Route a request, send it upstream, retry on another engine while that is still safe, and
hand back a response that streams the engine's bytes to the client."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import httpx

from gateway.config import ProxyConfig
from gateway.endpoints.outlier import OutlierDetector
from gateway.endpoints.registry import Endpoint
from gateway.errors import GatewayError, UpstreamConnectError
from gateway.kvindex.service import PrefixService
from gateway.metrics import GatewayMetrics
from gateway.proxy.stream import Outcome, PassthroughResponse
from gateway.proxy.transfer import CompletedTransfer, KVTransferRunner
from gateway.proxy.upstream import open_stream, upstream_headers
from gateway.proxy.usage import UsageTap, cached_tokens
from gateway.routing.cost_model import CostModel
from gateway.routing.router import RoutingDecision, Router
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH
from gateway.types import RoutingRequest

logger = logging.getLogger(__name__)

# Engine statuses that mean "this engine cannot take it now" rather than "bad request".
RETRYABLE_STATUSES = frozenset({502, 503})
ENGINE_HEADER = "x-gateway-engine"
PREDICTED_CACHED_HEADER = "x-gateway-predicted-cached-tokens"
PROMPT_TOKENS_HEADER = "x-gateway-prompt-tokens"


@dataclass(slots=True)
class _Attempt:
    """Book-keeping of one request on its chosen engine."""

    endpoint: Endpoint
    predicted_cached: int | None
    prefill_s: float  # predicted engine time, counted in the engine's queue until first byte
    queued_s: float  # what it was predicted to wait behind
    running: float  # requests on the engine when it was sent
    transfer: CompletedTransfer | None = None  # KV moved to the engine before sending
    in_queue: bool = True


class Dispatcher:
    def __init__(
        self,
        router: Router,
        client: httpx.AsyncClient,
        outlier: OutlierDetector,
        metrics: GatewayMetrics,
        config: ProxyConfig,
        prefix: PrefixService | None = None,
        cost_model: CostModel | None = None,
        transfers: KVTransferRunner | None = None,
    ) -> None:
        self._router = router
        self._client = client
        self._outlier = outlier
        self._metrics = metrics
        self._config = config
        self._prefix = prefix
        self._cost_model = cost_model or CostModel()
        self._transfers = transfers

    async def dispatch(self, request: RoutingRequest, body: bytes, started_at: float) -> PassthroughResponse:
        """Raises a GatewayError when no engine could answer; otherwise the response is the
        engine's own (4xx included), committed to that engine."""
        if self._prefix is not None:
            await self._prefix.annotate(request)
        body, strip_usage = self._ask_for_usage(request, body)
        last_error: GatewayError | None = None
        for attempt_no in range(self._config.max_retries + 1):
            decision = self._router.route(request)
            attempt = self._acquire(request, decision.endpoint)
            endpoint = decision.endpoint
            self._metrics.routing_decisions.labels(decision.policy, endpoint.id).inc()
            if self._transfers is not None and attempt_no == 0:
                try:
                    transfer = await self._transfers.prepare(request, endpoint)
                except BaseException:  # cancelled (client gone): nothing was sent for it
                    self._release(attempt)
                    raise
                if transfer is not None:
                    self._reprice(request, attempt, transfer)
            headers = upstream_headers(request.headers, endpoint, request.request_id)
            try:
                upstream = await open_stream(self._client, endpoint, request.api_path, headers, body)
            except UpstreamConnectError as exc:
                self._release(attempt)
                self._outlier.record_connect_failure(endpoint)
                last_error = exc
                reason = "connect_error"
            except GatewayError:
                self._release(attempt)
                raise
            else:
                if upstream.status_code not in RETRYABLE_STATUSES or attempt_no == self._config.max_retries:
                    return self._respond(request, decision, attempt, upstream, started_at, strip_usage)
                await upstream.aclose()
                self._release(attempt)
                last_error = None
                reason = f"status_{upstream.status_code}"
            logger.warning("request %s: engine %s failed (%s), retrying", request.request_id, endpoint.id, reason)
            self._metrics.upstream_retries.labels(reason).inc()
            request.excluded.add(endpoint.id)
            if not self._router.candidates_left(request):
                break
        if last_error is not None:
            raise last_error
        raise UpstreamConnectError("every engine tried for this request failed")

    def _ask_for_usage(self, request: RoutingRequest, body: bytes) -> tuple[bytes, bool]:
        """Streams carry usage only on request. To check each prediction, ask for it and
        remember to remove that extra event from what the client sees."""
        if self._prefix is None or not request.stream or request.api_path not in (CHAT_PATH, COMPLETIONS_PATH):
            return body, False
        options = request.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            return body, False
        patched = dict(request.body)
        patched["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return json.dumps(patched).encode(), True

    def _respond(
        self,
        request: RoutingRequest,
        decision: RoutingDecision,
        attempt: _Attempt,
        upstream: httpx.Response,
        started_at: float,
        strip_usage: bool,
    ) -> PassthroughResponse:
        endpoint = decision.endpoint
        route = request.api_path
        if self._prefix is not None and upstream.status_code == 200:
            self._prefix.record_routed(request, endpoint)
        first_byte_at: list[float] = []
        event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
        tap = UsageTap(event_stream=event_stream, strip_usage_event=strip_usage and event_stream)

        def on_first_byte() -> None:
            first_byte_at.append(time.perf_counter())
            self._leave_queue(attempt)
            if attempt.transfer is not None and self._transfers is not None:
                self._transfers.first_byte(attempt.transfer, first_byte_at[0])
            self._metrics.ttft.labels(request.model, route).observe(first_byte_at[0] - started_at)

        def on_finish(outcome: Outcome) -> None:
            self._release(attempt)
            status = str(upstream.status_code) if outcome == "complete" else outcome
            self._metrics.requests.labels(endpoint.id, request.model, route, status).inc()
            self._metrics.request_latency.labels(request.model, route).observe(time.perf_counter() - started_at)
            if outcome == "client_disconnected":
                self._metrics.client_disconnects.labels(route).inc()
                logger.info("request %s: client left before the end of the response", request.request_id)
            if outcome == "complete" and upstream.status_code == 200:
                ttft = (first_byte_at[0] if first_byte_at else time.perf_counter()) - started_at
                self._check_prediction(request, attempt, tap, ttft)

        headers = {ENGINE_HEADER: endpoint.id, "x-request-id": request.request_id}
        if attempt.predicted_cached is not None and request.num_prompt_tokens is not None:
            headers[PREDICTED_CACHED_HEADER] = str(attempt.predicted_cached)
            headers[PROMPT_TOKENS_HEADER] = str(request.num_prompt_tokens)
        return PassthroughResponse(upstream, headers, on_first_byte, on_finish, tap)

    def _check_prediction(self, request: RoutingRequest, attempt: _Attempt, tap: UsageTap, ttft_s: float) -> None:
        usage = tap.usage
        actual = cached_tokens(usage)
        if usage is None or actual is None:
            return
        prompt_tokens = usage.get("prompt_tokens")
        if isinstance(prompt_tokens, int):
            # Time to first byte is time to first token only when streaming, or for one token;
            # after a transfer it also holds the transfer (timed and calibrated on its own).
            if (request.stream or usage.get("completion_tokens") == 1) and attempt.transfer is None:
                self._cost_model.observe(actual, prompt_tokens, ttft_s, attempt.queued_s, attempt.running)
        if attempt.predicted_cached is None or self._prefix is None:
            return
        engine = attempt.endpoint.id
        m = self._metrics
        m.predicted_cached_tokens.labels(engine).inc(attempt.predicted_cached)
        m.engine_cached_tokens.labels(engine).inc(actual)
        if isinstance(prompt_tokens, int):
            m.prompt_tokens.labels(engine).inc(prompt_tokens)
        error = actual - attempt.predicted_cached
        m.prediction_error.observe(error)
        block = self._prefix.block_size
        verdict = "within_one_block" if abs(error) <= block else ("under" if error > 0 else "over")
        m.predictions.labels(verdict).inc()

    def _acquire(self, request: RoutingRequest, endpoint: Endpoint) -> _Attempt:
        predicted, prefill_s = self._predicted_prefill(request, endpoint)
        attempt = _Attempt(endpoint, predicted, prefill_s, queued_s=endpoint.pending_prefill_s, running=endpoint.load)
        endpoint.in_flight += 1
        endpoint.pending_prefill_s += prefill_s
        self._metrics.in_flight.labels(endpoint.id).set(endpoint.in_flight)
        return attempt

    def _predicted_prefill(self, request: RoutingRequest, endpoint: Endpoint) -> tuple[int | None, float]:
        """(cached tokens the engine should report, its predicted prefill seconds)."""
        if self._prefix is None or request.num_prompt_tokens is None:
            return None, 0.0
        predicted = self._prefix.predicted_cached_tokens(request, endpoint.id)
        return predicted, self._cost_model.prefill_s(predicted, request.num_prompt_tokens - predicted)

    def _reprice(self, request: RoutingRequest, attempt: _Attempt, transfer: CompletedTransfer) -> None:
        """After a transfer the engine holds more of the prompt: less to prefill."""
        attempt.transfer = transfer
        predicted, prefill_s = self._predicted_prefill(request, attempt.endpoint)
        if attempt.in_queue:
            pending = attempt.endpoint.pending_prefill_s - attempt.prefill_s + prefill_s
            attempt.endpoint.pending_prefill_s = max(0.0, pending)
        attempt.predicted_cached = predicted
        attempt.prefill_s = prefill_s

    def _leave_queue(self, attempt: _Attempt) -> None:
        if attempt.in_queue:
            attempt.in_queue = False
            attempt.endpoint.pending_prefill_s = max(0.0, attempt.endpoint.pending_prefill_s - attempt.prefill_s)

    def _release(self, attempt: _Attempt) -> None:
        self._leave_queue(attempt)
        attempt.endpoint.in_flight -= 1
        self._metrics.in_flight.labels(attempt.endpoint.id).set(attempt.endpoint.in_flight)
