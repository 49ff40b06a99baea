"""Routing policies and failover, observed through the x-gateway-engine header."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from engine_adapter.launch.launcher import EngineFleet
from tests.conftest import MODEL_NAME
from tests.harness import GatewayServer, engine_core, gateway_config, stopped

pytestmark = pytest.mark.integration


def routed_engine(base_url: str, headers: dict[str, str] | None = None) -> str:
    resp = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 1},
        headers=headers or {},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["x-gateway-engine"]


def wait_for_idle_engines(engine_configs: list[dict[str, Any]]) -> None:
    """Earlier tests may still be finishing work on the shared engines; least_loaded reads the
    engines' own running counts, so start from idle."""
    from engine_adapter.metrics import parse_engine_metrics

    deadline = time.monotonic() + 30
    for engine in engine_configs:
        while parse_engine_metrics(httpx.get(f"{engine['url']}/metrics", timeout=30).text).num_requests_running:
            assert time.monotonic() < deadline, f"{engine['name']} stays busy"
            time.sleep(0.2)


def engine_load(url: str) -> float:
    from engine_adapter.metrics import parse_engine_metrics

    # CPU vLLM answers /metrics slowly while busy, more so on a starved machine.
    stats = parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    return stats.num_requests_running + stats.num_requests_waiting


def gateway_sees_load(gateway: GatewayServer, engine: str) -> float:
    """The load the gateway scraped from `engine` (its admin view)."""
    state = httpx.get(f"{gateway.url}/admin/engines", headers={"authorization": "Bearer admin"}, timeout=30).json()
    (mine,) = [e for e in state["engines"] if e["id"] == engine]
    return (mine["num_requests_running"] or 0) + (mine["num_requests_waiting"] or 0)


def observe_least_loaded(engine_configs: list[dict[str, Any]], fleet: EngineFleet) -> tuple[list[str], list[str]]:
    """Load one engine directly (another client), hold that load (its engine core stopped
    once the engine reports it), route through the gateway, and return the engines chosen."""
    busy = engine_configs[0]
    # Prefill work, not decoding: while CPU vLLM decodes several requests its /metrics can take
    # seconds to answer. Sixteen uncached 6,000-token prompts: one prefill at a time (its KV
    # cache holds one), the others waiting. A starved machine once finished them all before a
    # gateway had started and scraped the engine, hence the stopped core: the engine's API
    # server still answers /metrics with the load, and the load stays until the core resumes.
    rng = random.Random(time.monotonic_ns())
    outcomes: list[str] = []

    def load_directly(prompt: list[int]) -> None:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1}
        try:
            resp = httpx.post(f"{busy['url']}/v1/completions", json=body, timeout=180)
            outcomes.append(str(resp.status_code))
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    config = gateway_config(
        engine_configs, routing={"policy": "least_loaded"}, health={"interval_s": 0.5}, server={"admin_token": "admin"}
    )
    chosen: list[str] = []
    prompts = [[rng.randint(10, 4000) for _ in range(6000)] for _ in range(16)]
    holders = [threading.Thread(target=load_directly, args=(p,)) for p in prompts]
    with GatewayServer(config) as gateway:
        for holder in holders:
            holder.start()
        try:
            deadline = time.monotonic() + 60
            while engine_load(busy["url"]) < 3:
                if time.monotonic() > deadline:
                    outcomes.append("the engine never showed the load")
                    return chosen, outcomes  # inconclusive: the caller repeats the attempt
                time.sleep(0.1)
            with stopped([engine_core(fleet, busy["name"]).pid]):
                if engine_load(busy["url"]) < 3:
                    outcomes.append("the load was gone before the core stopped")
                    return chosen, outcomes
                deadline = time.monotonic() + 60
                while gateway_sees_load(gateway, busy["name"]) < 3:  # its health rounds scrape /metrics
                    assert time.monotonic() < deadline, "the gateway never saw the engine's load"
                    time.sleep(0.1)
                for _ in range(3):
                    # The busy engine stays a candidate: avoiding it must be least_loaded's doing.
                    assert engine_available(gateway, busy["name"]), "the busy engine left rotation"
                    try:
                        chosen.append(routed_engine(gateway.url))
                    except httpx.TimeoutException:  # sent to the stopped engine: it cannot answer
                        chosen.append(busy["name"])
        finally:
            for holder in holders:
                if holder.is_alive() or holder.ident is not None:
                    holder.join(180)
    return chosen, outcomes


def engine_available(gateway: GatewayServer, engine: str) -> bool:
    state = httpx.get(f"{gateway.url}/admin/engines", headers={"authorization": "Bearer admin"}, timeout=30).json()
    return bool(next(e for e in state["engines"] if e["id"] == engine)["available"])


def test_least_loaded_avoids_the_busy_engine(engine_configs: list[dict[str, Any]], engine_fleet: EngineFleet) -> None:
    """Another client loads one engine; the gateway sees it in the engine's metrics and sends
    its requests to the other one, three decisions in all."""
    idle = engine_configs[1]["name"]
    attempts = []
    for _ in range(3):
        wait_for_idle_engines(engine_configs)
        chosen, outcomes = observe_least_loaded(engine_configs, engine_fleet)
        assert set(chosen) <= {idle}, (chosen, outcomes)
        attempts.append((chosen, outcomes))
        if chosen:
            return
    pytest.fail(f"the loaded engine never showed its load: {attempts}")


def test_session_affinity_is_sticky_and_spreads(engine_configs: list[dict[str, Any]]) -> None:
    config = gateway_config(engine_configs, routing={"policy": "session"})
    with GatewayServer(config) as gateway:
        first = {s: routed_engine(gateway.url, {"x-session-id": f"user-{s}"}) for s in range(12)}
        again = {s: routed_engine(gateway.url, {"x-session-id": f"user-{s}"}) for s in range(12)}
        assert first == again
        assert len(set(first.values())) == 2, "12 sessions should land on both engines"
        assert gateway.metric("gateway_routing_decisions_total", policy="session") == 24


def test_round_robin_alternates(engine_configs: list[dict[str, Any]]) -> None:
    config = gateway_config(engine_configs, routing={"policy": "round_robin"})
    with GatewayServer(config) as gateway:
        chosen = [routed_engine(gateway.url) for _ in range(6)]
        assert chosen[0::2] == [chosen[0]] * 3 and chosen[1::2] == [chosen[1]] * 3
        assert chosen[0] != chosen[1]


def test_killed_engine_fails_over(engine_fleet: EngineFleet, engine_configs: list[dict[str, Any]]) -> None:
    # Health checks far apart: the gateway still believes the killed engine is up, so the
    # first attempt really hits a dead port and the proxy must retry on the other engine.
    config = gateway_config(
        engine_configs, routing={"policy": "round_robin"}, health={"interval_s": 600, "timeout_s": 15}
    )
    victim = engine_fleet.engines[0]
    survivor = engine_fleet.engines[1].spec.name
    with GatewayServer(config) as gateway:
        # Both engines passed the start-up check, so the first request really tries the victim.
        assert all(e.available() for e in gateway.app.state.runtime.registry.endpoints)
        victim.kill()
        try:
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=30)
            for _ in range(4):
                raw = client.completions.with_raw_response.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
                assert raw.parse().choices[0].text is not None
                assert raw.headers["x-gateway-engine"] == survivor
            assert gateway.metric("gateway_upstream_retries_total", reason="connect_error") >= 1
        finally:
            engine_fleet.restart(victim.spec.name)
    # The restarted engine serves again.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert httpx.get(f"{victim.spec.url}/health", timeout=2).status_code == 200
            break
        except (httpx.HTTPError, AssertionError):
            assert time.monotonic() < deadline
            time.sleep(0.5)
