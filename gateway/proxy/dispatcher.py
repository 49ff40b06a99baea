"""Route a request, send it upstream, retry on another engine while that is still safe, and
hand back a response that streams the engine's bytes to the client.

Beside the retry loop, one module each: the load ledger (`ledger.py`: in-flight counts and
queued prefill per engine), the prediction feedback (`feedback.py`), the usage request on
streams (`usage.py`), Responses affinity (`response_affinity.py`)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence


from engine_adapter.errors import says_engine_dead
from gateway.config import ProxyConfig
from gateway.endpoints.outlier import FIRST_BYTE_TIMEOUT, STREAM_STALL, OutlierDetector
from gateway.endpoints.registry import Endpoint
from gateway.errors import (
    EndpointNotServed,
    FirstByteTimeout,
    GatewayError,
    NoHealthyEndpoint,
    ResponseNotFound,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.kvindex.service import PrefixService
from gateway.limits.routing_slots import RoutingSlots
from gateway.metrics import GatewayMetrics
from gateway.proxy.paths import PASSTHROUGH_PATHS, RESPONSES_PATH
from gateway.proxy.disaggregation import Disaggregation, FirstAttempt
from gateway.proxy.feedback import PredictionFeedback
from gateway.proxy.ledger import Attempt, LoadLedger
from gateway.proxy.response_affinity import ResponseAffinity, name_response
from gateway.proxy.stream import Outcome, PassthroughResponse
from gateway.proxy.transfer import KVTransferRunner
from gateway.proxy.upstream import (
    UpstreamClient,
    UpstreamResponse,
    open_stream,
    prefetch_first_chunk,
    read_small,
    upstream_headers,
)
from gateway.proxy.usage import UsageTap, ask_for_usage
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel
from gateway.routing.router import RoutingDecision, Router
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH
from gateway.types import RoutingRequest

logger = logging.getLogger(__name__)

# Engine statuses that mean "this engine cannot take it now" rather than "bad request".
RETRYABLE_STATUSES = frozenset({502, 503})
ENGINE_HEADER = "x-gateway-engine"
PREDICTED_CACHED_HEADER = "x-gateway-predicted-cached-tokens"
PROMPT_TOKENS_HEADER = "x-gateway-prompt-tokens"
PREFILL_ENGINE_HEADER = "x-gateway-prefill-engine"
# What FastAPI (vLLM's server) answers for a path it has no route for.
_NO_SUCH_ROUTE = {"detail": "Not Found"}


class Dispatcher:
    def __init__(
        self,
        router: Router,
        client: UpstreamClient,
        outlier: OutlierDetector,
        metrics: GatewayMetrics,
        config: ProxyConfig,
        prefix: PrefixService | None = None,
        cost_model: CostModel | None = None,
        transfers: KVTransferRunner | None = None,
        responses: ResponseAffinity | None = None,
        store_model: StoreLoadModel | None = None,
        routing_slots: RoutingSlots | None = None,
    ) -> None:
        """`routing_slots`: the worker's cap on prompts routed at once (shared by generations)."""
        self._router = router
        self._routing_slots = routing_slots
        self._client = client
        self._outlier = outlier
        self._metrics = metrics
        self._config = config
        self._prefix = prefix
        cost_model = cost_model or CostModel()
        store_model = store_model or StoreLoadModel()
        self._ledger = LoadLedger(prefix, cost_model, metrics, store_model)
        self._feedback = PredictionFeedback(cost_model, metrics, prefix, store_model)
        self._transfers = transfers
        self._disaggregation = Disaggregation(
            router, client, self._ledger, self._feedback, outlier, metrics, config, prefix, transfers
        )
        # Responses API: response id -> the engine that stored it.
        self.responses = responses if responses is not None else ResponseAffinity(
            fleet=lambda: [e.id for e in router.registry.endpoints]
        )

    @property
    def disaggregation(self) -> Disaggregation:
        return self._disaggregation

    async def dispatch(self, request: RoutingRequest, body: bytes, started_at: float) -> PassthroughResponse:
        """Raises a GatewayError when no engine could answer; otherwise the response is the
        engine's own (4xx included), committed to that engine."""
        # An unknown model (404) or one no engine can take now (503) is answered before any
        # tokenization: it must cost nothing and change nothing for the models that exist.
        self._router.candidates(request)
        if request.api_path == RESPONSES_PATH:
            self._pin_to_previous_response(request)
        # Pass-through APIs are routed by model and load only: their bodies are no prompt
        # the gateway tokenizes. A pinned request has its engine already, and its prompt
        # continues a conversation the engine stored, which the gateway never saw.
        if self._prefix is not None and request.api_path not in PASSTHROUGH_PATHS and request.pinned_engine is None:
            if self._routing_slots is None:
                await self._prefix.annotate(request)
            else:
                with self._routing_slots:
                    await self._prefix.annotate(request)
        strip_usage = False
        if self._prefix is not None and request.stream and request.api_path in (CHAT_PATH, COMPLETIONS_PATH):
            body, strip_usage = ask_for_usage(request.body, body)
        # Prefill/decode disaggregation: the prefill runs here, the decode is the first attempt.
        first: FirstAttempt | None = await self._disaggregation.first_attempt(request, body)
        last_error: GatewayError | None = None
        for attempt_no in range(self._config.max_retries + 1):
            decode = first if attempt_no == 0 and first is not None and first.prefill_engine is not None else None
            decision = first.decision if attempt_no == 0 and first is not None else self._router.route(request)
            endpoint = decision.endpoint
            attempt = self._ledger.acquire_decode(endpoint) if decode else self._ledger.acquire(request, endpoint)
            self._metrics.routing_decisions.labels(decision.policy, endpoint.id).inc()
            if self._transfers is not None and attempt_no == 0 and decode is None:
                try:
                    transfer = await self._transfers.prepare(request, endpoint)
                except BaseException:  # cancelled (client gone): nothing was sent for it
                    self._ledger.release(attempt)
                    raise
                if transfer is not None:
                    self._ledger.reprice(request, attempt, transfer)
            headers = upstream_headers(request.headers, endpoint, request.request_id)
            outgoing = (
                name_response(self.responses, request.body, body, endpoint.id) if request.api_path == RESPONSES_PATH
                else decode.body if decode is not None
                else body
            )  # fmt: skip
            try:
                upstream = await self._open_until_first_byte(request, endpoint, headers, outgoing)
            except UpstreamConnectError as exc:
                self._ledger.release(attempt)
                self._outlier.record_connect_failure(endpoint)
                if self._pinned(request, endpoint):
                    raise
                last_error = exc
                reason = "connect_error"
            except UpstreamTimeout as exc:
                self._ledger.release(attempt)
                self._metrics.upstream_timeouts.labels(endpoint.id, "first_byte").inc()
                self._outlier.record_timeout(endpoint, FIRST_BYTE_TIMEOUT)
                # Nothing reached the client: another engine can take it, unless the client
                # waited the socket's whole read timeout already.
                if not isinstance(exc, FirstByteTimeout) or self._pinned(request, endpoint):
                    raise
                last_error = exc
                reason = "first_byte_timeout"
            except UpstreamError as exc:
                # The engine failed before its first byte (it closed a stream it had started):
                # nothing reached the client, so another engine can take it.
                self._ledger.release(attempt)
                self._outlier.record_failure(endpoint)
                if self._pinned(request, endpoint):
                    raise
                last_error = exc
                reason = "upstream_error"
            except BaseException:  # GatewayError, or cancelled: the client left before the engine answered
                self._ledger.release(attempt)
                raise
            else:
                if upstream.status_code == 404:
                    upstream = await self._unless_api_missing(request, endpoint, attempt, upstream)
                dead = False
                if upstream.status_code == 500:
                    upstream, dead = await self._engine_dead(endpoint, attempt, upstream)
                if (
                    (upstream.status_code not in RETRYABLE_STATUSES and not dead)
                    or attempt_no == self._config.max_retries
                    or self._pinned(request, endpoint)
                ):
                    return self._respond(request, decision, attempt, upstream, started_at, strip_usage,
                                         prefill_engine=decode.prefill_engine if decode else None)  # fmt: skip
                await upstream.aclose()
                self._ledger.release(attempt)
                if dead:
                    self._outlier.record_engine_dead(endpoint)
                else:
                    self._outlier.record_failure(endpoint)
                last_error = None
                reason = "engine_dead" if dead else f"status_{upstream.status_code}"
            logger.warning("request %s: engine %s failed (%s), retrying", request.request_id, endpoint.id, reason)
            if decode is not None:  # the decode engine: the retries are unified
                self._metrics.disaggregated_requests.labels("decode_failed").inc()
            self._metrics.upstream_retries.labels(reason).inc()
            request.excluded.add(endpoint.id)
            if not self._router.candidates_left(request):
                break
        if last_error is not None:
            raise last_error
        raise UpstreamConnectError("every engine tried for this request failed")

    async def _open_until_first_byte(
        self, request: RoutingRequest, endpoint: Endpoint, headers: dict[str, str], body: bytes
    ) -> UpstreamResponse:
        """The engine's response once its first byte is here (a stream's first event; for a
        non-streamed request, its headers: the answer comes whole), or UpstreamTimeout.

        A stream gets `first_byte_timeout_s`; a non-streamed request has only the socket's
        read timeout. Either wait ends at once when outlier detection finds the engine hung
        (`Endpoint.first_byte_waits`), so no request hangs on an engine known to be stuck."""
        deadline = asyncio.timeout(self._config.first_byte_timeout_s if request.stream else None)
        endpoint.first_byte_waits.add(deadline)
        upstream: UpstreamResponse | None = None
        try:
            async with deadline:
                upstream = await open_stream(self._client, endpoint, request.api_path, headers, body)
                if request.stream and upstream.status_code == 200:
                    upstream = await prefetch_first_chunk(upstream)
        except TimeoutError:
            if upstream is not None:
                await upstream.aclose()  # the engine aborts the request
            raise FirstByteTimeout(f"engine {endpoint.id} sent nothing for this request in time") from None
        finally:
            endpoint.first_byte_waits.discard(deadline)
        return upstream

    async def _unless_api_missing(
        self, request: RoutingRequest, endpoint: Endpoint, attempt: Attempt, upstream: UpstreamResponse
    ) -> UpstreamResponse:
        """An engine's 404 as it is, unless it is its web framework's `{"detail": "Not Found"}`:
        the engine has no such API (a pass-through API its model does not offer, say /classify
        on an embedding model). That becomes the gateway's own OpenAI-shaped 404."""
        try:
            small = await read_small(upstream, endpoint)
        except BaseException:  # GatewayError, or cancelled: the client left
            self._ledger.release(attempt)
            raise
        if small is None:
            return upstream
        if small.header("content-encoding") in ("", "identity"):
            try:
                missing = json.loads(small.content) == _NO_SUCH_ROUTE
            except (ValueError, UnicodeDecodeError):
                missing = False
            if missing:
                self._ledger.release(attempt)
                raise EndpointNotServed(f"The engine serving model `{request.model}` has no {request.api_path} API.")
        return small

    async def _engine_dead(
        self, endpoint: Endpoint, attempt: Attempt, upstream: UpstreamResponse
    ) -> tuple[UpstreamResponse, bool]:
        """A 500 as it is, and whether it says the engine itself is dead (not this request)."""
        try:
            small = await read_small(upstream, endpoint)
        except BaseException:  # GatewayError, or cancelled: the client left
            self._ledger.release(attempt)
            raise
        if small is None:
            return upstream, False
        return small, small.header("content-encoding") in ("", "identity") and says_engine_dead(500, small.content)

    async def forward_stored(
        self, request: RoutingRequest, method: str, path: str, response_id: str, started_at: float
    ) -> PassthroughResponse:
        """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel (`path` with its query):
        to the engine that stored the response. `request.api_path` is the route template.

        An id the gateway knows goes to its engine (a draining one too: it still holds the
        response); when that engine is down or ejected → 503. An unknown id (the gateway
        restarted, another replica saw it) is asked of every reachable engine in turn until
        one does not answer 404: safe, as an engine without the id changes nothing and a
        cancel only acts where the response is. None has it → the gateway's own 404
        (`response_not_found`)."""
        owner = self.responses.engine_for(response_id)
        registry = self._router.registry
        if owner is not None:
            endpoint = registry.get(owner)
            if endpoint is None or endpoint not in registry.reachable():
                raise NoHealthyEndpoint(
                    f"Engine {owner}, which stored response '{response_id}', is not available; retry later."
                )
            endpoints: Sequence[Endpoint] = [endpoint]
        else:
            endpoints = registry.reachable()
            if not endpoints:
                raise NoHealthyEndpoint("No engine is available; retry later.")
        last_error: GatewayError | None = None
        for endpoint in endpoints:
            request.model = registry.model_of(endpoint.id) or ""
            attempt = self._ledger.acquire(request, endpoint)
            headers = upstream_headers(request.headers, endpoint, request.request_id)
            try:
                upstream = await open_stream(self._client, endpoint, path, headers, b"", method=method)
            except UpstreamConnectError as exc:
                self._ledger.release(attempt)
                self._outlier.record_connect_failure(endpoint)
                last_error = exc
                continue
            except BaseException:  # GatewayError, or cancelled: the client left before the engine answered
                self._ledger.release(attempt)
                raise
            if upstream.status_code == 404 and owner is None:
                await upstream.aclose()
                self._ledger.release(attempt)
                continue
            if upstream.status_code == 200 and owner is None:
                self.responses.remember(response_id, endpoint.id)
            decision = RoutingDecision(endpoint, "response_affinity", {})
            return self._respond(request, decision, attempt, upstream, started_at, False, observe=False)
        if last_error is not None:
            raise last_error
        raise ResponseNotFound(f"Response with id '{response_id}' not found.", param="response_id")

    def _pin_to_previous_response(self, request: RoutingRequest) -> None:
        """A request continuing a stored response goes to the engine that stored it, while
        that engine is a candidate (Router.candidates); an id the gateway does not know (it
        restarted, or another gateway replica saw the response) is routed normally."""
        previous = request.body.get("previous_response_id")
        engine = self.responses.engine_for(previous)
        if engine is not None:
            request.pinned_engine = engine
        elif previous is not None:
            logger.info("request %s: previous_response_id %r is unknown here, routing normally",
                        request.request_id, previous)  # fmt: skip

    @staticmethod
    def _pinned(request: RoutingRequest, endpoint: Endpoint) -> bool:
        """Whether `endpoint` is the only engine that can serve `request`. Then a failure
        there is the answer: no retry elsewhere, as any other engine lacks the stored
        response and would answer 404 for `previous_response_id`, hiding the real failure
        (the engine down or overloaded) behind a wrong one. The client sees the engine's
        502/503 or the gateway's 502 and can retry once the engine is back; a retry now on
        the same engine would meet the same state (and a connect failure ejects it)."""
        return request.pinned_engine is not None and request.pinned_engine == endpoint.id

    def _respond(
        self,
        request: RoutingRequest,
        decision: RoutingDecision,
        attempt: Attempt,
        upstream: UpstreamResponse,
        started_at: float,
        strip_usage: bool,
        *,
        observe: bool | None = None,
        prefill_engine: str | None = None,
    ) -> PassthroughResponse:
        """`observe`: check the prediction and feed the cost model from the engine's usage
        (default: for the APIs the gateway routes by prefix, not for pass-through ones; never
        for a disaggregated request's decode engine, given `prefill_engine`: its time to first
        token is the prefill's and the pull's, its prefill engine's answer was observed)."""
        endpoint = decision.endpoint
        route = request.api_path
        if observe is None:
            observe = route not in PASSTHROUGH_PATHS and prefill_engine is None
        if self._prefix is not None and upstream.status_code == 200:
            self._prefix.record_routed(request, endpoint)
        first_byte_at: list[float] = []
        event_stream = upstream.header("content-type").startswith("text/event-stream")
        on_response_id: Callable[[str], None] | None = None
        if route == RESPONSES_PATH and upstream.status_code == 200:
            # Recorded as soon as it is seen (a stream's first event), so a background
            # response can be retrieved or cancelled while it is still running.
            on_response_id = functools.partial(self.responses.remember, engine=endpoint.id)
        tap = UsageTap(
            event_stream=event_stream, strip_usage_event=strip_usage and event_stream, on_response_id=on_response_id
        )

        def on_first_byte() -> None:
            first_byte_at.append(time.perf_counter())
            self._ledger.first_byte(attempt)
            if attempt.transfer is not None and self._transfers is not None:
                self._transfers.first_byte(attempt.transfer, first_byte_at[0])
            self._metrics.ttft.labels(request.model, route).observe(first_byte_at[0] - started_at)

        def on_finish(outcome: Outcome) -> None:
            self._ledger.release(attempt)
            if outcome == "upstream_stalled":
                self._metrics.upstream_timeouts.labels(endpoint.id, "stream_stall").inc()
                self._outlier.record_timeout(endpoint, STREAM_STALL)
            elif outcome == "upstream_failed" or upstream.status_code >= 500:
                self._outlier.record_failure(endpoint)
            elif outcome == "complete":
                self._outlier.record_success(endpoint)
            status = str(upstream.status_code) if outcome == "complete" else outcome
            if prefill_engine is not None:
                self._metrics.disaggregated_requests.labels(outcome).inc()
            self._metrics.requests.labels(endpoint.id, request.model, route, status).inc()
            self._metrics.request_latency.labels(request.model, route).observe(time.perf_counter() - started_at)
            if outcome == "client_disconnected":
                self._metrics.client_disconnects.labels(route).inc()
                logger.info("request %s: client left before the end of the response", request.request_id)
            if outcome == "complete" and upstream.status_code == 200 and observe:
                ttft = (first_byte_at[0] if first_byte_at else time.perf_counter()) - started_at
                self._feedback.observe(request, attempt, tap.usage, ttft)

        headers = {ENGINE_HEADER: endpoint.id, "x-request-id": request.request_id}
        if prefill_engine is not None:
            headers[PREFILL_ENGINE_HEADER] = prefill_engine
        if attempt.predicted_cached is not None and request.num_prompt_tokens is not None:
            headers[PREDICTED_CACHED_HEADER] = str(attempt.predicted_cached)
            if not request.num_prompt_tokens_estimated:
                headers[PROMPT_TOKENS_HEADER] = str(request.num_prompt_tokens)
        idle_timeout_s = self._config.stream_idle_timeout_s if request.stream else None
        return PassthroughResponse(upstream, headers, on_first_byte, on_finish, tap, idle_timeout_s)
