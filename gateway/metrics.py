"""The gateway's own Prometheus metrics, on a registry owned by the app (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests answered, by engine, model, route and HTTP status.",
            ["engine", "model", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "gateway_request_duration_seconds", "Time from request received to last byte sent.",
            ["model", "route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Time from request received to the first response byte sent to the client "
            "(time to first token for streaming requests).",
            ["model", "route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("gateway_engine_in_flight", "Requests in flight per engine.", ["engine"], registry=r)
        self.engine_healthy = Gauge("gateway_engine_healthy", "1 if the engine is in rotation.", ["engine"], registry=r)
        self.routing_decisions = Counter(
            "gateway_routing_decisions", "Routing decisions by policy and chosen engine.",
            ["policy", "engine"], registry=r,
        )  # fmt: skip
        self.upstream_retries = Counter(
            "gateway_upstream_retries", "Requests retried on another engine, by reason.", ["reason"], registry=r
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects", "Responses abandoned by the client mid-way.", ["route"], registry=r
        )
