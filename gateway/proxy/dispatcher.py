"""Route a request, send it upstream, retry on another engine while that is still safe, and
hand back a response that streams the engine's bytes to the client."""

from __future__ import annotations

import logging
import time

import httpx

from gateway.config import ProxyConfig
from gateway.endpoints.outlier import OutlierDetector
from gateway.endpoints.registry import Endpoint
from gateway.errors import GatewayError, UpstreamConnectError
from gateway.metrics import GatewayMetrics
from gateway.proxy.stream import Outcome, PassthroughResponse
from gateway.proxy.upstream import open_stream, upstream_headers
from gateway.routing.router import RoutingDecision, Router
from gateway.types import RoutingRequest

logger = logging.getLogger(__name__)

# Engine statuses that mean "this engine cannot take it now" rather than "bad request".
RETRYABLE_STATUSES = frozenset({502, 503})
ENGINE_HEADER = "x-gateway-engine"


class Dispatcher:
    def __init__(
        self,
        router: Router,
        client: httpx.AsyncClient,
        outlier: OutlierDetector,
        metrics: GatewayMetrics,
        config: ProxyConfig,
    ) -> None:
        self._router = router
        self._client = client
        self._outlier = outlier
        self._metrics = metrics
        self._config = config

    async def dispatch(self, request: RoutingRequest, body: bytes, started_at: float) -> PassthroughResponse:
        """Raises a GatewayError when no engine could answer; otherwise the response is the
        engine's own (4xx included), committed to that engine."""
        last_error: GatewayError | None = None
        for attempt in range(self._config.max_retries + 1):
            decision = self._router.route(request)
            endpoint = decision.endpoint
            self._metrics.routing_decisions.labels(decision.policy, endpoint.id).inc()
            self._acquire(endpoint)
            headers = upstream_headers(request.headers, endpoint, request.request_id)
            try:
                upstream = await open_stream(self._client, endpoint, request.api_path, headers, body)
            except UpstreamConnectError as exc:
                self._release(endpoint)
                self._outlier.record_connect_failure(endpoint)
                last_error = exc
                reason = "connect_error"
            except GatewayError:
                self._release(endpoint)
                raise
            else:
                if upstream.status_code not in RETRYABLE_STATUSES or attempt == self._config.max_retries:
                    return self._respond(request, decision, upstream, started_at)
                await upstream.aclose()
                self._release(endpoint)
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

    def _respond(
        self, request: RoutingRequest, decision: RoutingDecision, upstream: httpx.Response, started_at: float
    ) -> PassthroughResponse:
        endpoint = decision.endpoint
        route = request.api_path

        def on_first_byte() -> None:
            self._metrics.ttft.labels(request.model, route).observe(time.perf_counter() - started_at)

        def on_finish(outcome: Outcome) -> None:
            self._release(endpoint)
            status = str(upstream.status_code) if outcome == "complete" else outcome
            self._metrics.requests.labels(endpoint.id, request.model, route, status).inc()
            self._metrics.request_latency.labels(request.model, route).observe(time.perf_counter() - started_at)
            if outcome == "client_disconnected":
                self._metrics.client_disconnects.labels(route).inc()

        headers = {ENGINE_HEADER: endpoint.id, "x-request-id": request.request_id}
        return PassthroughResponse(upstream, headers, on_first_byte, on_finish)

    def _acquire(self, endpoint: Endpoint) -> None:
        endpoint.in_flight += 1
        self._metrics.in_flight.labels(endpoint.id).set(endpoint.in_flight)

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self._metrics.in_flight.labels(endpoint.id).set(endpoint.in_flight)
