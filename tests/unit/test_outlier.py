"""Engine faults against fake engines: first-byte and stall timeouts, outlier ejection with
backoff, the ejection cap, half-open probes. (Real engines paused with SIGSTOP:
tests/integration/test_engine_faults.py.)"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import OutlierDetectionConfig, parse_config
from gateway.endpoints.outlier import CONNECT_ERROR, FIRST_BYTE_TIMEOUT, OutlierDetector
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.types import EngineId
from tests.unit.test_proxy import engine_json

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}
FIRST_BYTE_TIMEOUT_S = 0.3
STREAM_IDLE_TIMEOUT_S = 0.3
Answer = Callable[[httpx.Request], Awaitable[httpx.Response]]


def sse(*events: bytes, pause_s: float = 0.0, pause_after: int = 0) -> httpx.Response:
    """A streamed answer: `events` as SSE, with a silence of `pause_s` after the first
    `pause_after` of them (before any, when 0)."""

    async def body() -> AsyncIterator[bytes]:
        for number, event in enumerate(events):
            if number == pause_after and pause_s:
                await asyncio.sleep(pause_s)
            yield b"data: " + event + b"\n\n"

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(body()))


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk


async def streams_fine(request: httpx.Request) -> httpx.Response:
    return sse(b'{"choices":[{"text":"hi"}]}', b"[DONE]")


class Fleet:
    """Engines a and b (c with `three`); `answers[name]` answers inference requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (engine, path) of inference requests
        self.answers: dict[str, Answer] = {}

    async def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if path in ("/metrics", "/kv_event_sources"):
            return httpx.Response(200, text="" if path == "/metrics" else "{}")
        self.calls.append((request.url.host, path))
        return await self.answers.get(request.url.host, streams_fine)(request)

    def engines_called(self) -> list[str]:
        return [engine for engine, _ in self.calls]


@pytest.fixture()
def fleet() -> Fleet:
    return Fleet()


def app_client(fleet: Fleet, names: str = "ab", **outlier: object) -> TestClient:
    config = parse_config(
        {
            "engines": [{"name": n, "url": f"http://{n}"} for n in names],
            "routing": {"policy": "round_robin"},
            "proxy": {"first_byte_timeout_s": FIRST_BYTE_TIMEOUT_S, "stream_idle_timeout_s": STREAM_IDLE_TIMEOUT_S},
            "health": {"interval_s": 600},
            "outlier_detection": {"base_ejection_s": 60, **outlier},
        }
    )
    return TestClient(build_app(config, transport=httpx.MockTransport(fleet.handler)))


@pytest.fixture()
def client(fleet: Fleet) -> Iterator[TestClient]:
    with app_client(fleet) as test_client:
        yield test_client


def stream(client: TestClient) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})


def metric(client: TestClient, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_stream_without_a_first_byte_is_retried_elsewhere_and_the_engine_ejected(
    client: TestClient, fleet: Fleet
) -> None:
    async def silent(request: httpx.Request) -> httpx.Response:
        # Headers at once (as vLLM sends them), then nothing for far longer than the timeout.
        return sse(b"{}", pause_s=30)

    fleet.answers["a"] = silent
    started = time.monotonic()
    resp = stream(client)
    assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == "b"
    assert b"[DONE]" in resp.content
    assert time.monotonic() - started < 10  # the timeout, not the engine's 30 s
    assert fleet.engines_called() == ["a", "b"]
    assert metric(client, "gateway_upstream_timeouts_total", engine="a", kind="first_byte") == 1
    assert metric(client, "gateway_engine_ejections_total", engine="a", reason="first_byte_timeout") == 1
    # Ejected: nothing more is sent to a.
    for _ in range(3):
        assert stream(client).headers["x-gateway-engine"] == "b"


def test_a_stream_that_goes_silent_ends_with_an_in_band_error(client: TestClient, fleet: Fleet) -> None:
    async def stalls(request: httpx.Request) -> httpx.Response:
        return sse(b'{"choices":[{"text":"one"}]}', b'{"choices":[{"text":"two"}]}', pause_s=30, pause_after=1)

    fleet.answers["a"] = stalls
    started = time.monotonic()
    resp = stream(client)
    assert time.monotonic() - started < 10
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0]) == {"choices": [{"text": "one"}]}
    error = json.loads(events[-1])["error"]
    assert error["type"] == "upstream_error" and "sent nothing" in error["message"]
    assert metric(client, "gateway_upstream_timeouts_total", engine="a", kind="stream_stall") == 1
    assert metric(client, "gateway_engine_ejections_total", engine="a", reason="stream_stall") == 1
    assert stream(client).headers["x-gateway-engine"] == "b"


def test_a_slow_but_steady_stream_is_not_a_stall(client: TestClient, fleet: Fleet) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(5):  # 5 events, each after 2/3 of the idle timeout: 0.8 s in all
                await asyncio.sleep(STREAM_IDLE_TIMEOUT_S * 2 / 3)
                yield b'data: {"choices":[]}\n\n'
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(body()))

    fleet.answers["a"] = slow
    resp = stream(client)
    assert resp.headers["x-gateway-engine"] == "a"
    assert resp.text.count("data: ") == 6 and "error" not in resp.text
    assert metric(client, "gateway_engine_ejections_total") == 0


def test_failed_answers_eject_after_consecutive_failures_and_a_success_resets_the_count(fleet: Fleet) -> None:
    async def fails(request: httpx.Request) -> httpx.Response:
        return engine_json(500, {"error": {"message": "boom"}})

    fleet.answers["a"] = fails
    with app_client(fleet, names="abc", consecutive_failures=2, max_ejected_fraction=0.5) as client:
        on_a = [r for r in (stream(client) for _ in range(3)) if r.headers["x-gateway-engine"] == "a"]
        assert len(on_a) == 1 and on_a[0].status_code == 500  # one failure: still in rotation
        fleet.answers["a"] = streams_fine
        assert [stream(client).headers["x-gateway-engine"] for _ in range(3)].count("a") == 1  # a success
        fleet.answers["a"] = fails
        for _ in range(6):  # two more rounds: a fails twice in a row
            stream(client)
        assert metric(client, "gateway_engine_ejections_total", engine="a", reason="failed_answers") == 1
        fleet.calls.clear()
        for _ in range(4):
            stream(client)
        assert "a" not in fleet.engines_called()


def registry(*names: str) -> EndpointRegistry:
    return EndpointRegistry([Endpoint(id=EngineId(n), url=f"http://{n}") for n in names])


def test_ejections_double_up_to_the_maximum_and_are_forgiven_after_a_quiet_spell() -> None:
    fleet = registry("a", "b", "c", "d")
    a = fleet.endpoints[0]
    detector = OutlierDetector(fleet, OutlierDetectionConfig(base_ejection_s=5, max_ejection_s=30))
    durations = []
    for _ in range(5):
        now = time.monotonic()
        assert detector.record_timeout(a, FIRST_BYTE_TIMEOUT)
        durations.append(round(a.ejected_until - now))
        detector.restore(a)
    assert durations == [5, 10, 20, 30, 30]
    a.restored_at -= 31  # in rotation for longer than max_ejection_s since
    now = time.monotonic()
    detector.record_connect_failure(a)
    assert round(a.ejected_until - now) == 5


def test_the_ejection_cap_keeps_enough_engines_in_rotation() -> None:
    fleet = registry("a", "b", "c", "d")
    detector = OutlierDetector(fleet, OutlierDetectionConfig(max_ejected_fraction=0.5))
    results = [detector.record_connect_failure(e) for e in fleet.endpoints]
    assert results == [True, True, False, False]
    assert sum(e.available() for e in fleet.endpoints) == 2
    # Never the only engine, whatever it does.
    alone = registry("x")
    assert not OutlierDetector(alone).record_timeout(alone.endpoints[0], FIRST_BYTE_TIMEOUT)
    assert alone.endpoints[0].available()


def test_an_ejection_ends_with_a_probe_and_a_failed_probe_doubles_it() -> None:
    async def scenario() -> list[tuple[str, float]]:
        fleet = registry("a", "b")
        a = fleet.endpoints[0]
        outcomes = [False, True]
        seen: list[tuple[str, float]] = []
        probed = asyncio.Event()

        async def probe(endpoint: Endpoint, timeout_s: float) -> bool:
            # Half-open: out of rotation while the probe runs.
            seen.append(("probing", endpoint.ejected_until))
            ok = outcomes.pop(0)
            if not outcomes:
                probed.set()
            return ok

        detector = OutlierDetector(fleet, OutlierDetectionConfig(base_ejection_s=0.05), probe=probe)
        assert detector.record_timeout(a, FIRST_BYTE_TIMEOUT)
        first_until = a.ejected_until
        await asyncio.wait_for(probed.wait(), 10)
        await asyncio.sleep(0)  # the probe's verdict is applied right after it returns
        seen.append(("restored", a.ejected_until))
        seen.append(("num_ejections", a.num_ejections))
        seen.append(("first", first_until))
        await detector.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == ("probing", math.inf) and seen[1] == ("probing", math.inf)
    assert seen[2] == ("restored", 0.0)
    assert seen[3] == ("num_ejections", 2)  # the failed probe ejected it a second time


def test_a_passing_health_check_ends_only_an_ejection_for_a_refused_connection() -> None:
    fleet = registry("a", "b", "c", "d")
    a, b = fleet.endpoints[:2]
    detector = OutlierDetector(fleet)
    detector.record_connect_failure(a)
    detector.record_timeout(b, FIRST_BYTE_TIMEOUT)
    detector.lift_after_health_check(a)
    detector.lift_after_health_check(b)
    assert a.available() and a.ejection_reason == CONNECT_ERROR
    assert not b.available()  # a hung engine core passes /health


def test_an_ejection_for_a_timeout_ends_the_waits_for_that_engines_first_byte() -> None:
    async def scenario() -> float:
        fleet = registry("a", "b")
        a = fleet.endpoints[0]
        detector = OutlierDetector(fleet)

        async def waiting_request() -> float:
            started = time.monotonic()
            deadline = asyncio.timeout(None)
            a.first_byte_waits.add(deadline)
            try:
                async with deadline:
                    await asyncio.sleep(30)  # an engine that never answers
            except TimeoutError:
                return time.monotonic() - started
            finally:
                a.first_byte_waits.discard(deadline)
            return math.inf

        waiter = asyncio.create_task(waiting_request())
        while not a.first_byte_waits:  # the request waits for its first byte
            await asyncio.sleep(0.01)
        detector.record_timeout(a, FIRST_BYTE_TIMEOUT)  # another request timed out there
        return await waiter

    assert asyncio.run(scenario()) < 5


def test_an_engine_whose_core_died_is_skipped_but_a_requests_own_500_is_not_retried(fleet: Fleet) -> None:
    async def dead(request: httpx.Request) -> httpx.Response:
        # What vLLM 0.32 answers once its engine core died (EngineDeadError).
        message = "EngineCore encountered an issue. See stack trace (above) for the root cause."
        return engine_json(500, {"error": {"message": message, "type": "InternalServerError", "code": 500}})

    async def broken_request(request: httpx.Request) -> httpx.Response:
        return engine_json(500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}})

    fleet.answers["a"] = dead
    with app_client(fleet) as client:
        resp = stream(client)
        assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == "b"
        assert metric(client, "gateway_engine_ejections_total", engine="a", reason="engine_dead") == 1
        fleet.answers["b"] = broken_request
        fleet.calls.clear()
        resp = stream(client)
        assert resp.status_code == 500 and fleet.engines_called() == ["b"]
