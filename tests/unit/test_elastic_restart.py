"""An engine that restarted (the health checks see a new process start time) comes back with an
empty cache: it is warmed as one that joins, out of rotation until then (fake engines, a fake
KV transfer). Joins: tests/unit/test_admin_engines.py; planning: tests/unit/test_elastic_warmup.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from starlette.testclient import TestClient

from engine_adapter.transfer.nixl import EngineAddress, NixlPullTransfer, TransferTimings
from gateway.elastic.fleet import ElasticFleet
from gateway.endpoints.registry import Endpoint
from gateway.kvindex.base import TIER_GPU
from gateway.runtime import GatewayRuntime
from gateway.types import EngineId
from tests.unit.fake_engines import Engines
from tests.unit.test_config_reload import Fleet, engine, gateway, runtime, served_by, wait_until, write

PROMPT = " ".join(f"word{i}" for i in range(200))


class RestartingFleet(Fleet):
    """Engines whose /metrics tell their process start time: a new one is a restart."""

    def __init__(self, engines: Engines) -> None:
        super().__init__(engines)
        self.started = {"a": 1000.0, "b": 1000.0}

    async def handler(self, request: httpx.Request) -> httpx.Response:
        response = await super().handler(request)
        if request.url.path != "/metrics":
            return response
        return httpx.Response(200, text=f"{response.text}process_start_time_seconds {self.started[request.url.host]}\n")

    def restart(self, name: str) -> None:
        self.started[name] += 60


class GatedTransfer:
    """KV pulls that wait for `gate`; records (holder, target) of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.control: httpx.AsyncClient | None = None
        self.cancelled_with_client_open: bool | None = None

    async def transfer(self, holder: EngineAddress, target: EngineAddress, model: str, prefix_token_ids: Sequence[int],
                       *, timeout_s: float, request_id: str) -> TransferTimings:  # fmt: skip
        self.calls.append((holder.url, target.url))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            assert self.control is not None
            self.cancelled_with_client_open = not self.control.is_closed
            raise
        return TransferTimings(0.01, 0.01)


@pytest.fixture()
def fleet(engines: Engines) -> RestartingFleet:
    return RestartingFleet(engines)


@contextmanager
def hot_fleet(fleet: RestartingFleet, tmp_path: Path, **elastic: Any) -> Iterator[tuple[TestClient, GatedTransfer]]:
    """Engines a and b (both with kv_transfer), a prompt both were sent, and that a holds in its
    cache (per its events) the fleet's one hot prefix; pulls through a GatedTransfer."""
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a", kv_transfer=True), engine("b", kv_transfer=True)], routing={"policy": "kv_aware"},
          kv_transfer={"min_prefix_tokens": 32}, elastic=elastic)  # fmt: skip
    with gateway(fleet, path) as client:
        rt = runtime(client)
        # Twice: a first request of a prompt no engine holds is tokenized by its head only.
        for _ in range(2):
            assert client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 1}).status_code == 200
        [hot] = rt.hot_prefixes.hottest()
        rt.index.add(EngineId("a"), hot.chunk_keys, TIER_GPU)
        transfer = GatedTransfer()
        transfer.control = rt.control
        rt.elastic = ElasticFleet(rt.hot_prefixes, cast(NixlPullTransfer, transfer), rt.metrics)
        yield client, transfer  # a pull still held when the gateway stops is cancelled


def restart(client: TestClient, fleet: RestartingFleet, name: str) -> bool:
    """`name` restarts, and a health check sees it. Whether it is available as that check
    returns, before anything the check started has run."""
    fleet.restart(name)
    rt = runtime(client)
    endpoint = rt.registry.get(name)
    assert endpoint is not None

    async def check() -> bool:
        await rt.checker.check(endpoint)
        return endpoint.available()

    available: bool = client.portal.call(check)
    return available


def candidates(rt: GatewayRuntime) -> set[str]:
    return {e.id for e in rt.registry.candidates("m")}


def b_of(rt: GatewayRuntime) -> Endpoint:
    endpoint = rt.registry.get("b")
    assert endpoint is not None
    return endpoint


def test_a_restarted_engine_is_warmed_out_of_rotation_then_serves(fleet: RestartingFleet, tmp_path: Path) -> None:
    with hot_fleet(fleet, tmp_path) as (client, transfer):
        rt = runtime(client)
        b = b_of(rt)
        assert candidates(rt) == {"a", "b"}
        assert not restart(client, fleet, "b")
        # Out of rotation while the warm-up runs, off the health checker's path (it returned).
        assert b.warming and not b.available() and candidates(rt) == {"a"}
        wait_until(lambda: bool(transfer.calls), "a pull into the restarted engine")
        assert transfer.calls == [("http://a", "http://b")]
        assert served_by(client, 4) == {"a"}
        client.portal.call(transfer.gate.set)
        wait_until(lambda: b.available(), "the warmed engine back in rotation")
        assert candidates(rt) == {"a", "b"} and not rt._warm_ups
        assert rt.warmed[EngineId("b")].num_pulled == 1


def test_with_warm_on_join_off_a_restarted_engine_is_back_in_rotation_at_once(
    fleet: RestartingFleet, tmp_path: Path
) -> None:
    with hot_fleet(fleet, tmp_path, warm_on_join=False) as (client, transfer):
        rt = runtime(client)
        assert restart(client, fleet, "b")
        assert b_of(rt).available() and not b_of(rt).warming and candidates(rt) == {"a", "b"}
        client.portal.call(asyncio.sleep, 0.05)
        assert transfer.calls == [] and not rt._warm_ups


def test_a_second_restart_during_the_warm_up_starts_no_second_one(fleet: RestartingFleet, tmp_path: Path) -> None:
    with hot_fleet(fleet, tmp_path) as (client, transfer):
        rt = runtime(client)
        restart(client, fleet, "b")
        wait_until(lambda: bool(transfer.calls), "a pull into the restarted engine")
        restart(client, fleet, "b")
        client.portal.call(asyncio.sleep, 0.05)
        assert len(transfer.calls) == 1 and len(rt._warm_ups) == 1 and b_of(rt).warming
        client.portal.call(transfer.gate.set)
        wait_until(lambda: b_of(rt).available(), "the warmed engine back in rotation")
        assert len(transfer.calls) == 1


def test_an_engine_failing_during_its_warm_up_is_not_left_warming(fleet: RestartingFleet, tmp_path: Path) -> None:
    with hot_fleet(fleet, tmp_path) as (client, transfer):
        rt = runtime(client)
        b = b_of(rt)
        restart(client, fleet, "b")
        wait_until(lambda: bool(transfer.calls), "a pull into the restarted engine")
        fleet.down.add("b")
        for _ in range(2):  # health.unhealthy_threshold
            client.portal.call(rt.checker.check_all)
        assert not b.healthy
        client.portal.call(transfer.gate.set)
        wait_until(lambda: not b.warming, "the warm-up to end")
        assert not b.available()
        fleet.down.discard("b")
        client.portal.call(rt.checker.check_all)
        assert b.available() and len(transfer.calls) == 1  # back, and no restart seen: no warm-up


def test_stopping_the_gateway_cancels_a_warm_up_under_way(fleet: RestartingFleet, tmp_path: Path) -> None:
    with hot_fleet(fleet, tmp_path) as (client, transfer):
        restart(client, fleet, "b")
        wait_until(lambda: bool(transfer.calls), "a pull into the restarted engine")
    # Cancelled by the runtime's stop, before the client the pulls use is closed.
    assert transfer.cancelled_with_client_open is True
