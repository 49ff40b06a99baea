"""An elastic fleet of real CPU engines with NIXL: a third engine joins through the admin API
and is warmed with the fleet's hot prefixes before its first request; a drained engine hands
the hot prefixes only it holds to a peer before the next requests for them arrive there."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine_adapter.launch.launcher import EngineFleet
from tests.conftest import BLOCK_SIZE, MODEL_NAME, nixl_fleet_running
from tests.harness import GatewayServer, gateway_config
from tests.integration.test_kv_transfer import ADMIN, held_on_gpu
from tests.integration.test_prefix_routing import text_of, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path) -> Iterator[EngineFleet]:
    with nixl_fleet_running(tiny_model_dir, 3, "elastic", timeout_s=600) as engines:
        yield engines


def engine_entry(fleet: EngineFleet, index: int) -> dict[str, Any]:
    spec = fleet.engines[index].spec
    return {"name": spec.name, "url": spec.url, "kv_events_endpoint": spec.kv_events_endpoint, "kv_transfer": True}


@pytest.fixture(scope="module")
def gateway(fleet: EngineFleet, model_configs: list[dict[str, Any]]) -> Iterator[GatewayServer]:
    # The third engine runs, but the gateway starts without it: it joins through the admin API.
    config = gateway_config(
        [engine_entry(fleet, 0), engine_entry(fleet, 1)], models=model_configs, routing={"policy": "kv_aware"},
        kv_index={"block_size": BLOCK_SIZE}, kv_transfer={"min_prefix_tokens": 256, "timeout_s": 20},
        server={"admin_token": "admin"}, elastic={"max_s": 120},
        # Three engines on two cores: a joining engine's first requests starve its /health.
        health={"timeout_s": 10, "unhealthy_threshold": 3},
    )  # fmt: skip
    with GatewayServer(config) as server:
        yield server


def complete(url: str, prompt: str) -> httpx.Response:
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def cached_tokens(resp: httpx.Response) -> int:
    return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def set_draining(gateway: GatewayServer, engine: str, draining: bool) -> httpx.Response:
    resp = httpx.post(f"{gateway.url}/admin/engines/{engine}/{'drain' if draining else 'undrain'}", headers=ADMIN,
                      timeout=120)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return resp


@contextmanager
def only_on(gateway: GatewayServer, fleet: EngineFleet, engine: str) -> Iterator[None]:
    """Requests go to `engine` alone meanwhile (the others drained).

    NOTE: three engines share two cores here (engine-2 shares core 0 with engine-0), and a NIXL
    pull between two engines on one core did not finish in 120 s (each one's UCX thread polls,
    the core is never free for the other). So the tests put the prefixes on engine-1, whose
    core no other engine shares, and every pull crosses cores, as it would between hosts."""
    in_gateway = [e["id"] for e in httpx.get(f"{gateway.url}/admin/engines", headers=ADMIN, timeout=30).json()["engines"]]
    others = [name for name in in_gateway if name != engine]
    for other in others:
        set_draining(gateway, other, True)
    try:
        yield
    finally:
        for other in others:
            set_draining(gateway, other, False)


def test_a_joining_engine_gets_the_hot_prefixes_before_its_first_request(
    gateway: GatewayServer, fleet: EngineFleet
) -> None:
    prefixes = [text_of(7100 + i, 900) for i in range(2)]
    holder = fleet.engines[1].spec.name
    with only_on(gateway, fleet, holder):
        for prefix in prefixes:
            for _ in range(2):  # used twice: hot
                assert complete(gateway.url, prefix).headers["x-gateway-engine"] == holder
            wait_until(lambda: held_on_gpu(gateway, prefix, holder) > 0, 20, "the holder's KV events")
    joining = engine_entry(fleet, 2)
    resp = httpx.post(f"{gateway.url}/admin/engines", json=joining, headers=ADMIN, timeout=180)
    assert resp.status_code == 200, resp.text
    state = resp.json()
    assert state["available"] and not state["warming"]
    assert state["warm_up"]["prefixes_pulled"] == 2, state
    print(f"join warm-up: {state['warm_up']}")
    name, url = joining["name"], joining["url"]
    # In rotation with the prefixes: the gateway knows from the engine's own events ...
    for prefix in prefixes:
        wait_until(lambda: held_on_gpu(gateway, prefix, name) > 0, 20, "the joined engine's KV events")
    # ... and its first requests of them hit (sent to it directly: the policy might send them
    # to the other holder, which is as good).
    for prefix in prefixes:
        resp = complete(url, prefix)
        prompt_tokens = int(resp.json()["usage"]["prompt_tokens"])
        print(f"joined engine's first request: {cached_tokens(resp)} of {prompt_tokens} prompt tokens cached")
        assert cached_tokens(resp) >= prompt_tokens - 2 * BLOCK_SIZE
    assert gateway.metric("gateway_elastic_prefixes_total", event="join", outcome="pulled") == 2


def test_a_drained_engine_hands_its_hot_prefixes_to_a_peer(gateway: GatewayServer, fleet: EngineFleet) -> None:
    prefix = text_of(7300, 900)
    holder = fleet.engines[1].spec.name
    with only_on(gateway, fleet, holder):
        for _ in range(2):  # a prompt's first request, no engine holding it, is tokenized by its head only
            assert complete(gateway.url, prefix).headers["x-gateway-engine"] == holder
        wait_until(lambda: held_on_gpu(gateway, prefix, holder) > 0, 20, "the holder's KV events")
    others = [e.spec.name for e in fleet.engines if e.spec.name != holder]
    assert all(held_on_gpu(gateway, prefix, other) == 0 for other in others)
    resp = set_draining(gateway, holder, True)
    try:
        assert resp.json()["hand_off"]["prefixes_pulled"] == 1, resp.json()
        print(f"drain hand-off: {resp.json()['hand_off']}")
        # Before the next request of the prefix, a peer holds it (its own events say so) ...
        wait_until(lambda: any(held_on_gpu(gateway, prefix, o) > 0 for o in others), 20, "a peer's KV events")
        transfers_before = gateway.metric("gateway_kv_transfers_total", outcome="attempted")
        # ... and that request hits there, with no transfer of its own.
        resp = complete(gateway.url, prefix + " and then the question")
        assert resp.headers["x-gateway-engine"] in others
        prompt_tokens = int(resp.json()["usage"]["prompt_tokens"])
        print(f"after the drain: {cached_tokens(resp)} of {prompt_tokens} prompt tokens cached on a peer")
        assert cached_tokens(resp) >= prompt_tokens - 3 * BLOCK_SIZE
        assert gateway.metric("gateway_kv_transfers_total", outcome="attempted") == transfers_before
    finally:
        set_draining(gateway, holder, False)
