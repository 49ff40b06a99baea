"""Server limits (gateway.limits) against a real uvicorn server in front of fake engines, over
raw sockets: slow clients, oversized headers, connection and concurrency caps.

Timing tolerance: a cut-off is expected within TOLERANCE_S after its deadline. The watchdog
fires on the deadline itself; what comes on top is the event loop's lag and the test's own
polling. Measured on a 2-core machine shared with other jobs, 18 runs of the five timeout
tests, 8 of them while bench.overhead loaded both cores: at most 0.01 s late. 0.5 s leaves
room for a slower machine without hiding a timeout that did not work (a cut-off that missed
its deadline comes a whole timeout, 1 s, later or never)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from bench.fake_engine import FakeEngine
from gateway.api.auth import APIKeys
from gateway.limits.admission import (
    ADMIT_DECREASE,
    ADMIT_INCREASE,
    ARRIVALS_WINDOW_S,
    MIN_ARRIVALS_FOR_LAG,
    MIN_ARRIVALS_IN_A_LONG_PASS,
    Admission,
)
from gateway.limits.loop_lag import EventLoopLag
from tests.harness import GatewayProcess, GatewayServer, fake_engine_in_thread, gateway_config
from tests.unit.fake_engines import Engines

TOLERANCE_S = 0.5
# The event loop's clock (uvloop: libuv's, in whole milliseconds, read once per loop pass) can
# be up to a millisecond behind the test's, so a cut-off may come that much before the
# deadline by the test's clock (seen under a CPU hog: 11 µs early).
EARLY_S = 0.001
COMPLETION = {"model": "m", "prompt": "hello", "max_tokens": 1}


# --- raw HTTP -----------------------------------------------------------------------------------


def request_bytes(path: str = "/v1/completions", body: bytes = b"", headers: dict[str, str] | None = None,
                  *, content_length: int | None = None) -> tuple[bytes, bytes]:  # fmt: skip
    """(request line and headers, body) of a POST."""
    fields = {"host": "gateway", "content-type": "application/json",
              "content-length": str(len(body) if content_length is None else content_length), **(headers or {})}  # fmt: skip
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode(), body


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


def read_answer(sock: socket.socket, timeout_s: float = 10.0) -> Answer:
    """One whole response (the gateway's all have a Content-Length), the connection left open.
    Reads not a byte beyond it: pipelined answers can arrive in one segment (seen on a busy
    machine), and the next call must find the next one."""
    sock.settimeout(timeout_s)
    raw = b""
    while not raw.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed after {raw!r}"
        raw += byte
    length = int(Answer(raw).headers["content-length"])
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, f"closed after {raw + body!r}"
        body += chunk
    return Answer(raw + body)


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def trickle_until_answered(sock: socket.socket, data: bytes, every_s: float, give_up_s: float) -> tuple[bytes, float]:
    """Send `data` a byte every `every_s` until the server answers or closes; what it sent and when."""
    deadline = time.monotonic() + give_up_s
    for byte in data:
        readable, _, _ = select.select([sock], [], [], every_s)
        if readable:
            break
        if time.monotonic() > deadline:
            raise AssertionError("the server let a slow client go on")
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        raise AssertionError("the whole request was sent before the server cut it off")
    answered_at = time.monotonic()
    return read_until_closed(sock, 5.0), answered_at


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- fixtures -----------------------------------------------------------------------------------


class HeldEngines:
    """The fake engines; after `hold()`, inference requests wait for `release`."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.release = threading.Event()
        self.release.set()
        self.held = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the gateway's, once it called

    def hold(self) -> None:
        self.release.clear()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.loop = asyncio.get_running_loop()
        if request.url.path == "/v1/completions" and not self.release.is_set():
            self.held += 1
            await asyncio.to_thread(self.release.wait, 30)
        return self.engines.handler(request)


@pytest.fixture()
def held(engines: Engines) -> Iterator[HeldEngines]:
    held = HeldEngines(engines)
    yield held
    held.release.set()


def start_gateway(held: HeldEngines, limits: dict[str, Any], **server: Any) -> GatewayServer:
    config = gateway_config([{"name": "a", "url": "http://a"}], limits=limits, server=server,
                            routing={"policy": "round_robin"}, health={"interval_s": 600})  # fmt: skip
    return GatewayServer(config, transport=httpx.MockTransport(held.handler)).start()


@pytest.fixture()
def gateway_factory(held: HeldEngines) -> Iterator[Callable[..., GatewayServer]]:
    started: list[GatewayServer] = []

    def factory(limits: dict[str, Any], **server: Any) -> GatewayServer:
        started.append(start_gateway(held, limits, **server))
        return started[-1]

    yield factory
    held.release.set()
    for gateway in started:
        gateway.stop()


TIMEOUTS = {"header_read_timeout_s": 1.0, "keep_alive_timeout_s": 1.0, "body_read_timeout_s": 1.0,
            "body_total_timeout_s": 2.0}  # fmt: skip


@pytest.fixture()
def timeouts(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    return gateway_factory(TIMEOUTS)


def connect(gateway: GatewayServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=5)


# --- timeouts -----------------------------------------------------------------------------------


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_timeout(timeouts: GatewayServer) -> None:
    head, _ = request_bytes(headers={"x-padding": "p" * 200})
    opened = time.monotonic()
    with connect(timeouts) as sock:
        raw, answered_at = trickle_until_answered(sock, head, every_s=0.1, give_up_s=10)
    assert 1.0 - EARLY_S <= answered_at - opened <= 1.0 + TOLERANCE_S
    answer = Answer(raw)
    assert answer.status == 408 and answer.headers["connection"] == "close"
    assert answer.error()["code"] == "request_timeout"
    assert timeouts.metric("gateway_rejections_total", reason="header_timeout") == 1


def test_the_header_timeout_runs_from_the_end_of_the_previous_response(timeouts: GatewayServer) -> None:
    head, body = request_bytes(body=json.dumps(COMPLETION).encode())
    with connect(timeouts) as sock:
        sent = time.monotonic()  # the response ends between these two
        sock.sendall(head + body)
        assert read_answer(sock).status == 200
        answered = time.monotonic()
        again, answered_at = trickle_until_answered(sock, head, every_s=0.1, give_up_s=10)
    assert sent + 1.0 - EARLY_S <= answered_at <= answered + 1.0 + TOLERANCE_S
    assert Answer(again).status == 408


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(timeouts: GatewayServer) -> None:
    opened = time.monotonic()
    with connect(timeouts) as sock:
        assert read_until_closed(sock, 10) == b""
        assert time.monotonic() - opened <= 1.0 + TOLERANCE_S


def test_a_stalled_body_is_cut_off_and_its_request_slot_given_back(
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    timeouts = gateway_factory({**TIMEOUTS, "max_concurrent_requests": 1})
    body = json.dumps(COMPLETION).encode()
    head, _ = request_bytes(content_length=len(body))
    with connect(timeouts) as sock:
        stalled = time.monotonic()
        sock.sendall(head + body[:10])
        raw = read_until_closed(sock, 10)
        cut = time.monotonic()
    assert 1.0 - EARLY_S <= cut - stalled <= 1.0 + TOLERANCE_S
    answer = Answer(raw)
    assert answer.status == 408 and answer.error()["code"] == "request_timeout"
    assert timeouts.metric("gateway_rejections_total", reason="body_timeout") == 1
    # max_concurrent_requests is 1: the slot the stalled request held is free again.
    assert httpx.post(f"{timeouts.url}/v1/completions", json=COMPLETION).status_code == 200


def test_a_body_trickled_within_the_gap_is_cut_off_at_the_total_body_timeout(timeouts: GatewayServer) -> None:
    body = json.dumps({**COMPLETION, "prompt": "x" * 200}).encode()
    head, _ = request_bytes(content_length=len(body))
    with connect(timeouts) as sock:
        started = time.monotonic()
        sock.sendall(head)
        raw, answered_at = trickle_until_answered(sock, body, every_s=0.3, give_up_s=10)
    assert 2.0 - EARLY_S <= answered_at - started <= 2.0 + TOLERANCE_S
    assert Answer(raw).status == 408


# The client below thinks THINK_S between requests: the keep-alive and header timeouts are
# longer by 1.7 s, which a starved test process has been seen to need (CI: a connection closed
# as idle after a 0.3 s think at a 1 s timeout), while still outlasting them takes seconds.
THINK_S = 0.3
KEPT_ALIVE = {**TIMEOUTS, "header_read_timeout_s": 2.0, "keep_alive_timeout_s": 2.0}


def test_a_busy_kept_alive_connection_and_a_long_answer_are_not_cut_off(gateway_factory: Callable[..., GatewayServer],
                                                                        held: HeldEngines) -> None:  # fmt: skip
    gateway = gateway_factory(KEPT_ALIVE)
    header_timeout_s = KEPT_ALIVE["header_read_timeout_s"]
    head, body = request_bytes(body=json.dumps(COMPLETION).encode())
    with connect(gateway) as sock:
        # Requests one after another for twice the header timeout: each one's clock starts anew.
        started = time.monotonic()
        while time.monotonic() - started < 2 * header_timeout_s:
            sock.sendall(head + body)
            assert read_answer(sock).status == 200
            time.sleep(THINK_S)
        # Two pipelined requests: both answered, and no stray 408 after them.
        sock.sendall((head + body) * 2)
        assert read_answer(sock).status == 200 and read_answer(sock).status == 200
        # An answer that takes longer than the header and body timeouts together (the engine
        # holds it) is the app's time, not the client's.
        held.hold()
        sock.sendall(head + body)
        wait_for(lambda: held.held == 1)
        time.sleep(header_timeout_s + KEPT_ALIVE["body_total_timeout_s"] + TOLERANCE_S)  # outlast the timeouts
        held.release.set()
        assert read_answer(sock).status == 200
        # Then idle: closed by keep-alive, nothing sent.
        assert read_until_closed(sock, KEPT_ALIVE["keep_alive_timeout_s"] + 5) == b""
    assert gateway.metric("gateway_rejections_total", reason="header_timeout") == 0
    assert gateway.metric("gateway_rejections_total", reason="body_timeout") == 0


# --- header size and count ----------------------------------------------------------------------


@pytest.fixture()
def small_headers(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    return gateway_factory({"max_header_bytes": 4096, "max_header_count": 20})


def post_raw(gateway: GatewayServer, headers: dict[str, str]) -> Answer:
    head, body = request_bytes(body=json.dumps(COMPLETION).encode(), headers=headers)
    with connect(gateway) as sock:
        sock.sendall(head + body)
        return read_answer(sock)


def test_headers_over_the_size_limit_get_431(small_headers: GatewayServer) -> None:
    assert post_raw(small_headers, {"x-big": "b" * 3500}).status == 200  # under 4096 in all
    answer = post_raw(small_headers, {"x-big": "b" * 5000})
    assert answer.status == 431
    assert answer.error()["code"] == "request_header_fields_too_large"
    assert small_headers.metric("gateway_rejections_total", reason="header_bytes") == 1


def test_a_header_that_never_ends_is_refused_once_over_the_limit(small_headers: GatewayServer) -> None:
    with connect(small_headers) as sock:
        # 1 MiB of one header that never ends: refused on its size, not when it is complete.
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nx-endless: " + b"e" * 1024 * 1024)
        answer = Answer(read_until_closed(sock, 5))
    assert answer.status == 431 and answer.error()["code"] == "request_header_fields_too_large"
    assert small_headers.metric("gateway_rejections_total", reason="header_bytes") == 1


def test_too_many_headers_get_431(small_headers: GatewayServer) -> None:
    few = {f"x-h{i}": "v" for i in range(10)}
    assert post_raw(small_headers, few).status == 200
    answer = post_raw(small_headers, {f"x-h{i}": "v" for i in range(30)})
    assert answer.status == 431 and answer.headers["connection"] == "close"
    assert answer.error()["code"] == "request_header_fields_too_large"
    assert small_headers.metric("gateway_rejections_total", reason="header_count") == 1


# --- connections --------------------------------------------------------------------------------


def test_connections_past_the_cap_are_refused_while_open_ones_are_served(
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    gateway = gateway_factory({"max_connections": 8, "header_read_timeout_s": 60, "keep_alive_timeout_s": 60})
    with httpx.Client(base_url=gateway.url) as client:  # one kept-alive connection
        assert client.post("/v1/completions", json=COMPLETION).status_code == 200
        idle = [connect(gateway) for _ in range(7)]  # 8 open now
        try:
            for _ in range(4):
                with connect(gateway) as extra:
                    started = time.monotonic()
                    raw = read_until_closed(extra, 5)
                    assert time.monotonic() - started < 1.0
                    answer = Answer(raw)
                    assert answer.status == 503 and answer.headers["retry-after"] == "1"
                    assert answer.error()["code"] == "too_many_connections"
            # The client already connected is still served, on its connection.
            assert client.post("/v1/completions", json=COMPLETION).status_code == 200
            assert client.get("/metrics").status_code == 200
            assert "gateway_rejections_total{reason=\"connections\"} 4.0" in client.get("/metrics").text
        finally:
            for sock in idle:
                sock.close()
    # Room again once the idle ones are gone (the server sees them close soon after).
    wait_for(lambda: httpx.get(f"{gateway.url}/health").status_code == 200)


# --- concurrency --------------------------------------------------------------------------------


def post_in_background(url: str, headers: dict[str, str] | None = None) -> tuple[threading.Thread, list[int]]:
    statuses: list[int] = []

    def post() -> None:
        statuses.append(httpx.post(f"{url}/v1/completions", json=COMPLETION, headers=headers, timeout=30).status_code)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, statuses


def test_past_the_concurrency_cap_requests_get_503_at_once_and_probes_still_answer(
    gateway_factory: Callable[..., GatewayServer], held: HeldEngines
) -> None:
    gateway = gateway_factory({"max_concurrent_requests": 2, "retry_after_s": 3})
    held.hold()
    running = [post_in_background(gateway.url) for _ in range(2)]
    wait_for(lambda: held.held == 2)
    started = time.monotonic()
    refused = httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION)
    assert time.monotonic() - started < 0.5
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "overloaded"
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    assert gateway.metric("gateway_rejections_total", reason="concurrency") == 1  # /metrics answers too
    assert httpx.get(f"{gateway.url}/admin/engines").status_code == 401  # reached the admin API: not refused
    held.release.set()
    for thread, statuses in running:
        thread.join(10)
        assert statuses == [200]
    assert httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION).status_code == 200


def test_a_key_at_its_cap_gets_429_while_other_keys_get_through(
    gateway_factory: Callable[..., GatewayServer], held: HeldEngines
) -> None:
    keys = [{"key": "k-batch-0123456789", "max_concurrent_requests": 2}, "k-chat-0123456789"]
    gateway = gateway_factory({"max_concurrent_requests_per_key": 1}, api_keys=keys)
    held.hold()
    batch = {"authorization": "Bearer k-batch-0123456789"}
    chat = {"x-api-key": "k-chat-0123456789"}
    running = [post_in_background(gateway.url, batch) for _ in range(2)]  # its own cap: 2
    wait_for(lambda: held.held == 2)
    refused = httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, headers=batch)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    running.append(post_in_background(gateway.url, chat))  # another key: served
    wait_for(lambda: held.held == 3)
    refused = httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, headers=chat)  # the default cap: 1
    assert refused.status_code == 429
    # A wrong key is not anybody's: 401, not a slot of a key.
    assert httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, headers={"x-api-key": "nope"}).status_code == 401
    assert gateway.metric("gateway_rejections_total", reason="key_concurrency") == 2
    held.release.set()
    for thread, statuses in running:
        thread.join(10)
        assert statuses == [200]


@contextlib.contextmanager
def hogged(held: HeldEngines, gateway: GatewayServer) -> Iterator[None]:
    """The gateway's event loop busy 30 ms on every pass: more requests than a core processes."""
    assert httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION).status_code == 200  # the loop, seen
    loop = held.loop
    assert loop is not None
    hogging = threading.Event()
    hogging.set()

    def hog() -> None:
        time.sleep(0.03)
        if hogging.is_set():
            loop.call_soon(hog)

    loop.call_soon_threadsafe(hog)
    try:
        yield
    finally:
        hogging.clear()


def test_while_the_event_loop_lags_requests_get_503_at_once_and_probes_still_answer(
    gateway_factory: Callable[..., GatewayServer], held: HeldEngines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standing 30 ms behind is over `max_event_loop_lag_s` (5 ms by default): while
    requests keep arriving, new ones are refused until the loop catches up. (Here every
    arrival counts as a backlog: a test client behind a loop that slow cannot send the
    `MIN_ARRIVALS_FOR_LAG` a real overload does; `test_admission_counts_lag_only_while_requests_keep_arriving`
    covers that condition.)"""
    monkeypatch.setattr("gateway.limits.admission.MIN_ARRIVALS_FOR_LAG", 1)
    gateway = gateway_factory({"retry_after_s": 2})
    refused: list[httpx.Response] = []

    def refused_once() -> bool:
        response = httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, timeout=10)
        assert response.status_code in (200, 503)
        if response.status_code == 503:
            refused.append(response)
        return bool(refused)

    with hogged(held, gateway):
        wait_for(refused_once)
        assert refused[0].headers["retry-after"] == "2"
        assert refused[0].json()["error"]["code"] == "overloaded"
        assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
        assert gateway.metric("gateway_rejections_total", reason="event_loop_lag") >= 1
    wait_for(lambda: httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, timeout=10).status_code == 200)


class StandingLag:
    standing_s = 0.05
    num_windows = 0

    def late_now_s(self) -> float:
        return 0.0


class LongPass:
    """No standing lag yet (no window has closed behind), but the pass now running is 50 ms
    past its timers."""

    standing_s = 0.0
    num_windows = 0

    def late_now_s(self) -> float:
        return 0.05


async def answer_ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def admission_behind(lag: object, max_loop_lag_s: float,
                     on_reject: Callable[[str], None] = lambda reason: None) -> Admission:  # fmt: skip
    """Admission in front of an app that answers 200, reading `lag`."""
    return Admission(answer_ok, max_requests=1000, api_keys=lambda: APIKeys([]), retry_after_s=1,
                     on_reject=on_reject, loop_lag=cast(EventLoopLag, lag), max_loop_lag_s=max_loop_lag_s)  # fmt: skip


async def status_through(admission: Admission) -> int:
    """The status of one bodiless request sent through `admission`."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await admission({"type": "http", "path": "/v1/completions", "headers": []}, receive, send)
    return int(sent[0]["status"])


def admitted_spaced_then_in_a_burst(lag: object, burst_size: int) -> tuple[list[int], list[int], list[str]]:
    """Statuses of 4 requests one each 2.5 arrival windows (never a backlog), then of
    `burst_size` back to back, through Admission behind `lag` (20 ms allowed); the reasons."""
    reasons: list[str] = []
    admission = admission_behind(lag, 0.02, reasons.append)

    async def scenario() -> tuple[list[int], list[int]]:
        spaced = []
        for _ in range(4):
            spaced.append(await status_through(admission))
            await asyncio.sleep(2.5 * ARRIVALS_WINDOW_S)
        burst = [await status_through(admission) for _ in range(burst_size)]
        return spaced, burst

    spaced, burst = asyncio.run(scenario())
    return spaced, burst, reasons


def test_admission_counts_lag_only_while_requests_keep_arriving() -> None:
    """Behind a lagging loop, a few requests now and then are admitted; once
    `MIN_ARRIVALS_FOR_LAG` arrive within a window and the one before, the rest are refused."""
    spaced, burst, reasons = admitted_spaced_then_in_a_burst(StandingLag(), MIN_ARRIVALS_FOR_LAG + 4)
    assert spaced == [200] * 4
    assert burst == [200] * (MIN_ARRIVALS_FOR_LAG - 1) + [503] * 5 and reasons == ["event_loop_lag"] * 5


def test_a_long_pass_refuses_a_flood_before_any_window_closes() -> None:
    """A pass of the loop already past the allowed lag refuses what arrives in it once a flood
    does (`MIN_ARRIVALS_IN_A_LONG_PASS`), not a burst a test or a few clients send."""
    spaced, burst, reasons = admitted_spaced_then_in_a_burst(LongPass(), MIN_ARRIVALS_IN_A_LONG_PASS + 4)
    assert spaced == [200] * 4
    assert MIN_ARRIVALS_IN_A_LONG_PASS > 2 * MIN_ARRIVALS_FOR_LAG
    assert burst == [200] * (MIN_ARRIVALS_IN_A_LONG_PASS - 1) + [503] * 5 and reasons == ["event_loop_lag"] * 5


class SteppedLag:
    """A loop-lag reading the test moves window by window."""

    def __init__(self) -> None:
        self.standing_s = 0.0
        self.num_windows = 0

    def late_now_s(self) -> float:
        return 0.0

    def close_window(self, standing_s: float) -> None:
        self.standing_s = standing_s
        self.num_windows += 1


def statuses_of(admission: Admission, num_requests: int) -> list[int]:
    """`num_requests` sent through `admission` back to back; their statuses."""

    async def all_of_them() -> list[int]:
        return [await status_through(admission) for _ in range(num_requests)]

    return asyncio.run(all_of_them())


def test_after_a_window_behind_admissions_are_capped_then_the_cap_rises_and_goes() -> None:
    """A window the loop ran behind through caps the windows after it at ADMIT_DECREASE of
    what it admitted (refusing while still behind), the cap rising by ADMIT_INCREASE each
    window it keeps up with the cap refusing, and gone after a window that refused nothing."""
    lag = SteppedLag()
    admission = admission_behind(lag, 0.005)
    assert statuses_of(admission, 50) == [200] * 50  # the loop keeps up: no cap
    lag.close_window(0.02)  # it fell behind through that window, which admitted 50
    # Still behind: refused, once a backlog's worth arrived (the rule above)
    assert statuses_of(admission, 30) == [200] * (MIN_ARRIVALS_FOR_LAG - 1) + [503] * (31 - MIN_ARRIVALS_FOR_LAG)
    lag.close_window(0.0)  # caught up
    cap = ADMIT_DECREASE * 50 * ADMIT_INCREASE  # 40, raised once: the last window refused some
    assert statuses_of(admission, 60) == [200] * math.ceil(cap) + [503] * (60 - math.ceil(cap))
    lag.close_window(0.0)
    cap *= ADMIT_INCREASE
    assert statuses_of(admission, 60) == [200] * math.ceil(cap) + [503] * (60 - math.ceil(cap))
    lag.close_window(0.0)
    assert statuses_of(admission, 20) == [200] * 20  # under the cap: nothing refused
    lag.close_window(0.0)
    assert statuses_of(admission, 200) == [200] * 200  # so no cap now


def test_a_few_clients_behind_a_lagging_loop_set_no_cap() -> None:
    """A window behind in which fewer than MIN_ARRIVALS_FOR_LAG were admitted is no overload:
    the windows after it admit everything."""
    lag = SteppedLag()
    admission = admission_behind(lag, 0.005)
    assert statuses_of(admission, MIN_ARRIVALS_FOR_LAG - 1) == [200] * (MIN_ARRIVALS_FOR_LAG - 1)
    lag.close_window(0.02)
    lag.close_window(0.0)
    assert statuses_of(admission, 100) == [200] * 100


@pytest.mark.parametrize("limits", [{"max_event_loop_lag_s": None}, {}], ids=["no-cap", "sequential"])
def test_a_lagging_loop_refuses_nothing_without_a_cap_or_a_backlog(
    gateway_factory: Callable[..., GatewayServer], held: HeldEngines, limits: dict[str, Any]
) -> None:
    """With no cap, nothing is refused; with the default cap, a sequential client is not
    either: one request at a time is no backlog, whatever else keeps the loop behind."""
    gateway = gateway_factory(limits)
    with hogged(held, gateway):
        started = time.monotonic()
        # Each waits behind the hog at least once: 10 span more than three 0.1 s windows.
        statuses = [httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, timeout=10).status_code
                    for _ in range(10)]  # fmt: skip
        assert time.monotonic() - started >= 0.3
    assert statuses == [200] * 10


# --- the CLI, several workers -------------------------------------------------------------------


def test_the_cli_with_workers_applies_the_limits_in_the_worker_processes(tmp_path: Path) -> None:
    """`python -m gateway` with `server.workers: 2`: the protocol and its limits reach the worker
    processes (uvicorn pickles them to each), and /metrics adds up the workers' rejections."""
    limits = {"header_read_timeout_s": 1.0, "keep_alive_timeout_s": 1.0, "max_header_count": 20}
    with fake_engine_in_thread(FakeEngine("m", "/models/m")) as engine_url:
        config = {"engines": [{"name": "a", "url": engine_url}], "server": {"workers": 2}, "limits": limits,
                  "routing": {"policy": "round_robin"}, "health": {"interval_s": 600}}  # fmt: skip
        with GatewayProcess(config, tmp_path / "gateway.log") as gateway:
            head, _ = request_bytes()
            # Enough connections that both workers take some (they race to accept each).
            for _ in range(4):
                opened = time.monotonic()
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
                    raw, answered_at = trickle_until_answered(sock, head, every_s=0.1, give_up_s=10)
                assert Answer(raw).status == 408 and answered_at - opened <= 1.0 + TOLERANCE_S
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
                    sock.sendall(request_bytes(headers={f"x-h{i}": "v" for i in range(30)})[0])
                    assert read_answer(sock).status == 431
            wait_for(lambda: gateway.metric("gateway_rejections_total", reason="header_timeout") == 4)
            assert gateway.metric("gateway_rejections_total", reason="header_count") == 4
            assert httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION).status_code == 200
        log = (tmp_path / "gateway.log").read_text()
    assert "open-file limit" in log and "Traceback" not in log
