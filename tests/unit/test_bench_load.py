"""The load benchmark (bench/load.py): its pure pieces, the fake engine's paced answers, and
both modes end to end at a tiny scale against fake engines served in this process, so the
benchmark cannot rot (a gateway subprocess with the round_robin policy: no tokenizer to load,
it starts in about a second)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.fake_engine import FakeEngine, HTTPProtocol, Paced
from bench.load import Conversations, gateway_config, main, slope_per_hour, stream_tokens, summarize
from gateway.config import GatewayConfig
from tests.unit.test_bench_overhead import dechunk

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


# -- pure pieces -----------------------------------------------------------------------------


def test_streams_last_past_the_ramp_and_the_hold() -> None:
    assert stream_tokens(25, 10, 1000) == 36  # (36 - 1) * 1 s = 35 s = ramp + hold
    assert stream_tokens(1, 1, 300) == 8  # 7 * 0.3 = 2.1 s >= 2 s
    assert stream_tokens(0, 0, 1000) == 2


def test_slope_is_least_squares_per_hour() -> None:
    assert slope_per_hour([(0, 100.0), (1800, 101.0), (3600, 102.0)]) == pytest.approx(2.0)
    assert slope_per_hour([(0, 5.0), (60, 5.0), (120, 5.0)]) == 0.0
    assert slope_per_hour([(0, 1.0)]) != slope_per_hour([(0, 1.0)])  # NaN
    stats = summarize([float(v) for v in range(1, 101)])
    assert (stats["p50"], stats["p99"], stats["max"], stats["count"]) == (51.0, 99.0, 100.0, 100.0)


def test_conversations_repeat_about_half_and_extend_what_was_sent() -> None:
    conversations = Conversations(random.Random(3), prompt_tokens=200, repeat_fraction=0.5)
    sent: list[list[dict[str, str]]] = []
    repeats = 0
    for _ in range(400):
        messages, repeat = conversations.next()
        if repeat:
            repeats += 1
            assert any(messages[: len(s)] == s and len(messages) == len(s) + 2 for s in sent)
        else:
            assert [m["role"] for m in messages] == ["system", "user"]
        sent.append(messages)
    assert 150 < repeats < 250


def test_the_gateway_config_is_valid_and_sets_only_limits_the_gateway_has() -> None:
    config, changed = gateway_config(["http://127.0.0.1:1", "http://127.0.0.1:2"], "tiny", "/models/tiny")
    GatewayConfig.model_validate(config)  # unknown keys are refused: none was written
    assert config["routing"] == {"policy": "prefix"} and len(config["engines"]) == 2
    assert changed == ["limits.max_connections: 1000000", "limits.max_concurrent_requests: 1000000"]
    assert config["limits"] == {"max_connections": 1_000_000, "max_concurrent_requests": 1_000_000}


# -- the fake engine's paced answers ---------------------------------------------------------


def test_a_paced_stream_is_the_same_bytes_in_one_part_per_token() -> None:
    fake = FakeEngine("tiny", "/models/tiny")
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    paced = fake.handle(b"POST", b"/v1/chat/completions", body, True, {b"x-fake-tokens": b"5",
                                                                      b"x-fake-inter-token-ms": b"40"})  # fmt: skip
    assert isinstance(paced, Paced) and len(paced.parts) == 5 and paced.interval_s == 0.04
    head, chunks = dechunk(b"".join(paced.parts))
    assert head.startswith(b"HTTP/1.1 200 OK") and chunks[-1] == b"data: [DONE]\n\n"
    events = [json.loads(c[6:]) for c in chunks[:-1]]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:5]) == "ok ok ok ok ok"
    assert events[5]["usage"]["completion_tokens"] == 5
    assert paced.parts[0].count(b"data: ") == 1 and paced.parts[-1].endswith(b"0\r\n\r\n")
    plain = fake.handle(b"POST", b"/v1/chat/completions", json.dumps(CHAT).encode(), True,
                        {b"x-fake-tokens": b"5", b"x-fake-inter-token-ms": b"40"})  # fmt: skip
    assert isinstance(plain, Paced) and len(plain.parts) == 1 and plain.first_delay_s == pytest.approx(0.16)
    # Without the headers, the engine's defaults: all at once, as before.
    assert isinstance(fake.handle(b"POST", b"/v1/chat/completions", body), bytes)


@pytest.fixture()
def served() -> Iterator[tuple[list[str], list[FakeEngine]]]:
    """Two fake engines on loopback ports, one thread of this process each."""
    urls, fakes, stops = [], [], []
    for _ in range(2):
        fake = FakeEngine("tiny-llama", "/unused")
        loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = loop.run_until_complete(loop.create_server(lambda f=fake: HTTPProtocol(f), sock=sock, backlog=1024))  # type: ignore[misc]
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
        fakes.append(fake)
        stops.append((loop, thread, server))
    try:
        yield urls, fakes
    finally:
        for loop, thread, server in stops:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=2)
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()


def test_paced_answers_over_http_count_while_running_and_stop_when_the_client_leaves(
    served: tuple[list[str], list[FakeEngine]],
) -> None:
    (url, _), (fake, _) = served
    pace = {"x-fake-tokens": "4", "x-fake-inter-token-ms": "100"}
    with httpx.Client(base_url=url, timeout=5) as client:
        started = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=pace) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert fake.active == 1
            assert 'fake_engine_active_responses 1\n' in httpx.get(f"{url}/metrics").text
            rest = [line for line in lines if line]
        assert time.perf_counter() - started >= 0.29 and rest[-1] == "data: [DONE]" and len(rest) == 4
        # The engine counts the response done just after its last byte: polled, not raced.
        wait_idle(fake)
        assert fake.peak_active == 1
        # The next request on the same kept-alive connection is served after the paced one.
        assert client.get("/health").status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                           headers={"x-fake-tokens": "50", "x-fake-inter-token-ms": "100"}) as resp:  # fmt: skip
            next(resp.iter_lines())
        # Leaving early closed the connection: the engine stops the stream.
        wait_idle(fake)
        assert fake.aborted == 1


def wait_idle(fake: FakeEngine, timeout_s: float = 20.0) -> None:
    """Generous: the suite must pass with both cores busy with other work."""
    deadline = time.monotonic() + timeout_s
    while fake.active:
        assert time.monotonic() < deadline, "the fake engine kept a response running"
        time.sleep(0.01)


# -- end to end ------------------------------------------------------------------------------


def test_both_modes_run_end_to_end_at_a_tiny_scale(served: tuple[list[str], list[FakeEngine]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    urls, fakes = served
    argv = ["streams", "soak", "--engine-url", urls[0], "--engine-url", urls[1], "--policy", "round_robin",
            "--no-pin", "--report-dir", str(tmp_path), "--settle-s", "1", "--sample-s", "0.25",
            "--streams", "20", "--ramp-s", "0.5", "--hold-s", "0.5", "--inter-token-ms", "100",
            "--rate", "20", "--duration-s", "2", "--window-s", "1", "--soak-prompt-tokens", "100",
            "--soak-tokens", "4", "--soak-inter-token-ms", "10"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "## Concurrent streams through the gateway" in out and "## Soak" in out
    reports = {p.name.split("-")[1]: p for p in tmp_path.glob("load-*.json")}
    assert set(reports) == {"streams", "soak"}
    assert {p.suffix for p in tmp_path.iterdir()} >= {".md", ".json"}

    streams = json.loads(reports["streams"].read_text())
    assert streams["errors"] == {} and streams["ok"] == 20 and streams["missing_tokens"] == 0
    assert streams["peak"] == {"client": 20, "gateway_in_flight": 20, "engines": 20}
    assert streams["gateway"]["in_flight_after"] == 0
    assert streams["gateway"]["start"]["fds"] > 0 and streams["gateway"]["peak"]["fds"] >= 40  # 20 in, 20 out
    assert streams["ttft_ms"]["p50"] < 1000 and 1.0 <= streams["duration_s"]["p50"] < 3.0
    assert sum(f.peak_active for f in fakes) >= 20 and all(f.active == 0 for f in fakes)

    soak = json.loads(reports["soak"].read_text())
    assert soak["errors"] == {} and soak["sent"] > 10 and 0 < soak["streamed"] < soak["sent"]
    assert sum(w["completed"] for w in soak["windows"]) == soak["sent"]
    assert len(soak["windows"]) >= 2 and all(w["rss_mib"] > 0 and w["fds"] > 0 for w in soak["windows"])
    assert soak["latency_ms"]["p50"] >= 30  # each answer took the engine 3 x 10 ms
