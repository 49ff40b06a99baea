"""The load ledger counts each request on its engine exactly once, whatever ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from gateway.api.openai import until_client_leaves
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU, TIER_STORAGE, PrefixMatch
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.service import PrefixService
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.metrics import GatewayMetrics
from gateway.proxy.ledger import LoadLedger
from gateway.proxy.stream import Outcome, PassthroughResponse
from gateway.proxy.upstream import BufferedResponse
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel
from gateway.types import EngineId, RoutingRequest


def ledger() -> LoadLedger:
    return LoadLedger(None, CostModel(), GatewayMetrics(CollectorRegistry()))


def routing_request() -> RoutingRequest:
    return RoutingRequest(model="m", api_path="/v1/completions", body={}, headers={}, request_id="r")


def test_a_second_release_of_one_request_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    engine = Endpoint("a", "http://a")
    load = ledger()
    first, second = load.acquire(routing_request(), engine), load.acquire(routing_request(), engine)
    load.release(first)
    with caplog.at_level(logging.ERROR):
        load.release(first)  # a bug elsewhere: it must not count `second` as gone
    assert engine.in_flight == 1
    assert "released twice" in caplog.text
    load.release(second)
    assert engine.in_flight == 0


class _Closing(BufferedResponse):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


class _Request:
    """What until_client_leaves reads of a Starlette request: the client is gone at once."""

    def __init__(self) -> None:
        self.url = type("U", (), {"path": "/v1/completions"})()
        self.method = "POST"
        self.app = type("A", (), {"state": type("S", (), {"metrics": GatewayMetrics(CollectorRegistry())})()})()

    async def receive(self) -> dict[str, str]:
        return {"type": "http.disconnect"}


def test_a_response_made_as_the_client_left_is_closed_and_released() -> None:
    """The dispatch ran past the cancel (it was finishing): its response is never sent, so
    the engine's response is closed there and the ledger lets go of it."""
    engine = Endpoint("a", "http://a")
    load = ledger()
    attempt = load.acquire(routing_request(), engine)
    upstream = _Closing(200, [], b"{}")
    outcomes: list[Outcome] = []

    def finish(outcome: Outcome) -> None:
        outcomes.append(outcome)
        load.release(attempt)

    async def dispatch_ignoring_the_cancel() -> PassthroughResponse:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # what a dependency swallowing a cancel looks like from here
        return PassthroughResponse(upstream, {}, lambda: None, finish)

    request = _Request()
    answer = asyncio.run(until_client_leaves(request, dispatch_ignoring_the_cancel()))  # type: ignore[arg-type]
    assert answer.status_code == 499
    assert upstream.closed and outcomes == ["client_disconnected"]
    # Counted once, by the response's own end (`finish` here), not again for the early leave.
    assert request.app.state.metrics.client_disconnects.labels("/v1/completions")._value.get() == 0
    assert engine.in_flight == 0


class _StayingRequest(_Request):
    """A client that stays until `leave` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.leave = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        await self.leave.wait()
        return {"type": "http.disconnect"}


def test_the_client_leaving_cancels_the_work_and_counts_once() -> None:
    cancelled: list[bool] = []

    async def dispatch_until_cancelled() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    request = _StayingRequest()

    async def run() -> tuple[object, int]:
        asyncio.get_running_loop().call_later(0.01, request.leave.set)
        answer = await until_client_leaves(request, dispatch_until_cancelled())  # type: ignore[arg-type]
        # The cancel was the client's: this task goes on uncancelled (a later await works).
        await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None
        return answer, task.cancelling()

    answer, cancelling = asyncio.run(run())
    assert getattr(answer, "status_code", None) == 499 and cancelled == [True] and cancelling == 0
    assert request.app.state.metrics.client_disconnects.labels("/v1/completions")._value.get() == 1


def test_work_that_ends_first_is_answered_and_a_later_leave_cancels_nothing() -> None:
    async def run() -> tuple[str, int]:
        request = _StayingRequest()
        answer = await until_client_leaves(request, asyncio.sleep(0.001, result="done"))  # type: ignore[arg-type]
        request.leave.set()  # the client goes after its answer: nothing to cancel
        await asyncio.sleep(0.02)
        task = asyncio.current_task()
        assert task is not None
        return answer, task.cancelling()

    assert asyncio.run(run()) == ("done", 0)


def test_a_store_load_counts_in_the_engines_queue() -> None:
    engine = Endpoint(EngineId("a"), "http://a", kv_store="s")
    prefix = PrefixService(InMemoryIndex(), None, EndpointRegistry([engine]), WorkingSetTracker(),  # type: ignore[arg-type]
                           KVLayout(16), speculative_ttl_s=5, approximate_ttl_s=60)  # fmt: skip
    cost, store = CostModel(), StoreLoadModel()
    load = LoadLedger(prefix, cost, GatewayMetrics(CollectorRegistry()), store)
    request = routing_request()
    request.num_prompt_tokens = 4096
    request.prefix_matches = {EngineId("a"): PrefixMatch(num_chunks=200, by_tier={TIER_STORAGE: 200, TIER_GPU: 50})}
    attempt = load.acquire(request, engine)
    # 3,200 tokens cached, 2,400 of them loaded from the store: the load is engine time too.
    assert attempt.predicted_cached == 3200
    assert attempt.prefill_s == pytest.approx(cost.prefill_s(3200, 896) + store.seconds(2400))
    assert engine.pending_prefill_s == pytest.approx(attempt.prefill_s)
