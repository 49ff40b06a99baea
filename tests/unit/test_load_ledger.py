"""The load ledger counts each request on its engine exactly once, whatever ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from gateway.api.openai import until_client_leaves
from gateway.endpoints.registry import Endpoint
from gateway.metrics import GatewayMetrics
from gateway.proxy.ledger import LoadLedger
from gateway.proxy.stream import Outcome, PassthroughResponse
from gateway.proxy.upstream import BufferedResponse
from gateway.routing.cost_model import CostModel
from gateway.types import RoutingRequest


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

    answer = asyncio.run(until_client_leaves(_Request(), dispatch_ignoring_the_cancel()))  # type: ignore[arg-type]
    assert answer.status_code == 499
    assert upstream.closed and outcomes == ["client_disconnected"]
    assert engine.in_flight == 0
