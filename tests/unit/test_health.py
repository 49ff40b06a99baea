"""Active health checks against fake engines."""

from __future__ import annotations

import asyncio

import httpx

from gateway.config import HealthConfig
from gateway.endpoints.health import HealthChecker
from gateway.endpoints.registry import EndpointRegistry
from gateway.config import EngineConfig

METRICS = "vllm:num_requests_running{engine=\"0\"} 3.0\nvllm:num_requests_waiting{engine=\"0\"} 1.0\n"


def run_rounds(handler, rounds: int) -> EndpointRegistry:  # type: ignore[no-untyped-def]
    registry = EndpointRegistry.from_config([EngineConfig(name="a", url="http://a")])

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            checker = HealthChecker(registry, client, HealthConfig(unhealthy_threshold=2, timeout_s=0.1))
            for _ in range(rounds):
                await checker.check_all()

    asyncio.run(go())
    return registry


def test_metrics_that_time_out_keep_the_engine_in_rotation_and_its_last_scrape() -> None:
    calls = {"metrics": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            calls["metrics"] += 1
            if calls["metrics"] > 1:  # busy engine: /metrics stops answering in time
                raise httpx.ReadTimeout("slow", request=request)
            return httpx.Response(200, text=METRICS)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(200)

    endpoint = run_rounds(handler, 4).endpoints[0]
    assert endpoint.healthy
    assert endpoint.stats is not None and endpoint.stats.num_requests_running == 3.0


def test_failing_health_takes_the_engine_out_after_the_threshold() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(503)
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    assert run_rounds(handler, 1).endpoints[0].healthy
    assert not run_rounds(handler, 2).endpoints[0].healthy
