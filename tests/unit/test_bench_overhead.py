"""The overhead benchmark's pure pieces (bench/overhead.py) and the fake engine's wire format
(bench/fake_engine.py). No subprocess: the one server test runs the fake engine's protocol
in a thread of this process."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.common import percentile
from bench.fake_engine import FakeEngine
from bench.overhead import (
    RatePoint,
    clean_rate_label,
    cold_requests,
    highest_clean_rate,
    is_clean,
    mixed_schedule,
    next_search_rate,
    overload_checks,
    plan_cpus,
    poisson_arrivals,
    repeat_requests,
)
from tests.harness import fake_engine_in_thread


def words(rng: random.Random, tokens: int) -> str:
    return " ".join(f"w{rng.randrange(10**6)}" for _ in range(max(1, tokens // 4)))


# -- percentiles ---------------------------------------------------------------------------


def test_percentile_is_nearest_rank_and_nan_when_empty() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 51.0  # index round(0.5 * 99) = 50 (banker's rounding: 49.5 -> 50)
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile(list(reversed(values)), 99) == 99.0  # order does not matter
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)  # NaN


# -- Poisson schedule ----------------------------------------------------------------------


def test_poisson_arrivals_are_bounded_sorted_and_seeded() -> None:
    times = poisson_arrivals(500, 4.0, 100_000, random.Random(3))
    assert times == sorted(times) and all(0 < t < 4.0 for t in times)
    assert abs(len(times) - 2000) < 4 * 2000**0.5  # mean 2000, sd ~45
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert abs(sum(gaps) / len(gaps) - 1 / 500) < 0.15 / 500  # exponential, mean 1/rate
    assert times == poisson_arrivals(500, 4.0, 100_000, random.Random(3))
    assert len(poisson_arrivals(500, 4.0, 50, random.Random(3))) == 50  # count bound
    assert poisson_arrivals(0, 4.0, 10, random.Random(3)) == []
    assert poisson_arrivals(10, 0, 10, random.Random(3)) == []


# -- the "highest clean rate" rule ---------------------------------------------------------


def point(rate: float, p99: float = 10.0, errors: int = 0, achieved: float | None = None) -> RatePoint:
    sent = int(rate * 5)
    return RatePoint(offered=rate, sent=sent, ok=sent - errors, errors=errors, p50_ms=p99 / 2, p99_ms=p99,
                     realized=rate, achieved=rate if achieved is None else achieved)  # fmt: skip


def test_clean_needs_no_errors_p99_under_the_limit_and_the_rate_carried() -> None:
    assert is_clean(point(100))
    assert not is_clean(point(100, errors=1))
    assert not is_clean(point(100, p99=100.0))  # strictly under
    assert is_clean(point(100, p99=99.9))
    assert not is_clean(point(100, p99=float("nan")))
    assert not is_clean(point(100, achieved=80))
    assert is_clean(point(100, achieved=91))
    assert not is_clean(RatePoint(offered=100, skipped=True))
    assert not is_clean(RatePoint(offered=100))  # nothing sent


def test_highest_clean_rate_is_below_the_lowest_failure() -> None:
    assert highest_clean_rate([point(100), point(200), point(500)]) == 500
    assert highest_clean_rate([point(100), point(200), point(500, p99=150)]) == 200
    # A clean result above a failure is luck, not capacity.
    assert highest_clean_rate([point(100), point(200, errors=3), point(500)]) == 100
    assert highest_clean_rate([point(100, errors=1), point(200)]) is None
    assert highest_clean_rate([]) is None
    assert highest_clean_rate([point(100), RatePoint(offered=200, skipped=True)]) == 100
    assert highest_clean_rate([point(100), point(200, p99=60)], p99_limit_ms=50) == 100


def test_labels_say_when_no_ceiling_or_no_floor_was_seen() -> None:
    assert clean_rate_label([point(100), point(500)]) == ">=500"
    assert clean_rate_label([point(100), point(500, errors=2)]) == "100"
    assert clean_rate_label([point(100, p99=300)]) == "<100"
    assert clean_rate_label([]) == "-"


def test_overload_passes_when_the_excess_is_refused_and_the_admitted_answered_in_time() -> None:
    def verdicts(p99_ms: float, **error_kinds: int) -> list[bool]:
        over = RatePoint(offered=2000, sent=5000, ok=3000, p99_ms=p99_ms, errors=sum(error_kinds.values()),
                         error_kinds={kind.lstrip("_"): n for kind, n in error_kinds.items()})  # fmt: skip
        return [met for _, _, _, met in overload_checks(over, p99_limit_ms=100)]

    assert verdicts(80.0, _503=1500, _429=500) == [True, True]
    assert verdicts(140.0, _503=2000) == [False, True]  # admitted, but answered late
    assert verdicts(80.0, _503=1990, timeout=10) == [True, False]  # lost: neither answered nor refused
    assert verdicts(80.0, _503=1990, conn=5, _502=5) == [True, False]
    assert verdicts(float("nan"), _503=5000) == [False, True]  # nothing admitted: no latency to show


def test_search_bisects_between_clean_and_unclean() -> None:
    assert next_search_rate([point(100), point(200), point(500)]) is None  # no ceiling seen
    assert next_search_rate([point(100), point(200), point(500, errors=9)]) == 350
    assert next_search_rate([point(100), point(200), point(350), point(500, errors=9)]) == 425
    assert next_search_rate([point(100, errors=1)]) == 50  # nothing clean: halve
    assert next_search_rate([point(15, errors=1)]) is None  # below the floor
    assert next_search_rate([point(200), point(220, p99=200)]) is None  # tight bracket


# -- workloads -----------------------------------------------------------------------------


def messages(body: bytes) -> list[dict[str, str]]:
    return json.loads(body)["messages"]  # type: ignore[no-any-return]


def test_cold_requests_never_share_a_system_prompt() -> None:
    bodies = cold_requests(words, "m", 20, 400, seed=1)
    assert len({messages(b)[0]["content"] for b in bodies}) == 20
    assert all(json.loads(b)["model"] == "m" and "stream" not in json.loads(b) for b in bodies)
    assert json.loads(cold_requests(words, "m", 1, 400, seed=1, stream=True)[0])["stream"] is True


def test_repeat_requests_extend_a_conversation_already_sent() -> None:
    warm, measured = repeat_requests(words, "m", 10, 400, seed=2, turns=4)
    assert len(warm) == 3 and len(measured) == 10
    sent = [messages(b) for b in warm]
    for body in measured:
        msgs = messages(body)
        earlier = [s for s in sent if msgs[: len(s)] == s and len(msgs) == len(s) + 2]
        assert earlier, "every measured request is one turn past a request sent before it"
        assert [m["role"] for m in msgs[-2:]] == ["assistant", "user"]
        sent.append(msgs)


def test_mixed_schedule_repeats_about_half_and_only_extends_earlier_requests() -> None:
    schedule = mixed_schedule(words, "m", rate_per_s=400, duration_s=2, max_count=10_000, tokens=200, seed=4)
    assert 650 < len(schedule) < 950
    repeats = sum(r for _, _, r in schedule)
    assert 0.4 < repeats / len(schedule) < 0.6
    seen: list[list[dict[str, str]]] = []
    for _, body, is_repeat in schedule:
        msgs = messages(body)
        if is_repeat:
            assert any(msgs[: len(s)] == s and len(msgs) == len(s) + 2 for s in seen)
        else:
            assert len(msgs) == 2
        seen.append(msgs)
    assert schedule == mixed_schedule(words, "m", rate_per_s=400, duration_s=2, max_count=10_000, tokens=200, seed=4)


def test_cpu_plan_splits_client_and_router() -> None:
    assert plan_cpus([0], 1) == (None, None)
    assert plan_cpus([0, 1], 1) == ({0}, {1})
    assert plan_cpus([0, 1], 2) == ({0}, {0, 1})  # two workers on two cores: both
    assert plan_cpus([0, 1, 2, 3], 2) == ({0}, {1, 2})


# -- the fake engine's wire format -----------------------------------------------------------


def dechunk(raw: bytes) -> tuple[bytes, list[bytes]]:
    """(head, the chunks) of a chunked HTTP/1.1 response; asserts it is well formed."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return head, chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


@pytest.fixture()
def fake() -> FakeEngine:
    return FakeEngine("tiny", "/models/tiny")


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_chat_is_three_sse_chunks_usage_when_asked_and_done(fake: FakeEngine, include_usage: bool) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    head, chunks = dechunk(fake.handle(b"POST", b"/v1/chat/completions", json.dumps(body).encode()))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-type: text/event-stream" in head and b"transfer-encoding: chunked" in head
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n\n") == 1 for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"
    events = [json.loads(c[len(b"data: ") :]) for c in chunks[:-1]]
    assert len(events) == (4 if include_usage else 3)
    tokens = events[:3]
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "tiny" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"]["content"] for e in tokens) == "ok ok ok"
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None, None, "length"]
    if include_usage:
        assert events[3]["choices"] == []
        assert events[3]["usage"]["completion_tokens"] == 3
        assert events[3]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_streamed_completion_and_plain_answers(fake: FakeEngine) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "stream": True}).encode()
    _, chunks = dechunk(fake.handle(b"POST", b"/v1/completions", body))
    texts = [json.loads(c[6:])["choices"][0]["text"] for c in chunks[:-1]]
    assert texts == ["ok", " ok", " ok"] and chunks[-1] == b"data: [DONE]\n\n"

    raw = fake.handle(b"POST", b"/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}]}')
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert f"content-length: {len(payload)}".encode() in head
    answer = json.loads(payload)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "ok ok ok", "reasoning_content": None,
                                               "tool_calls": []}  # fmt: skip
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    text = json.loads(fake.handle(b"POST", b"/v1/completions", b'{"prompt": "x"}').partition(b"\r\n\r\n")[2])
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "ok ok ok"


def test_control_routes(fake: FakeEngine) -> None:
    def get(path: bytes) -> tuple[bytes, bytes]:
        head, _, body = fake.handle(b"GET", path, b"").partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], body

    assert get(b"/health")[0] == b"HTTP/1.1 200 OK"
    models = json.loads(get(b"/v1/models")[1])["data"]
    assert models == [{"id": "tiny", "object": "model", "created": models[0]["created"], "owned_by": "vllm",
                       "root": "/models/tiny", "parent": None, "max_model_len": 131072, "permission": []}]  # fmt: skip
    assert json.loads(get(b"/kv_event_sources")[1]) == {}
    assert get(b"/nope")[0].startswith(b"HTTP/1.1 404") and json.loads(get(b"/nope")[1]) == {"detail": "Not Found"}
    assert fake.handle(b"POST", b"/v1/chat/completions/render", b"{}").startswith(b"HTTP/1.1 404")
    assert fake.handle(b"POST", b"/health", b"").startswith(b"HTTP/1.1 405")
    assert fake.handle(b"POST", b"/v1/completions", b"not json").startswith(b"HTTP/1.1 400")

    from engine_adapter.metrics.scraper import parse_engine_metrics

    text = get(b"/metrics")[1].decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info"):  # fmt: skip
        assert f"# TYPE {name} gauge" in text
    assert 'vllm:cache_config_info{block_size="32",num_gpu_blocks="100000"} 1.0' in text
    stats = parse_engine_metrics(text)
    assert (stats.block_size, stats.num_gpu_blocks, stats.num_requests_running) == (32, 100000, 0.0)
    assert stats.process_start_time == pytest.approx(fake.start_time, abs=0.01)


def test_tokenize_gives_the_gateway_tokenizers_ids(tiny_model_dir: Path) -> None:
    from gateway.tokenization.models import PROBES
    from gateway.tokenization.tokenizer import HFPromptTokenizer

    fake = FakeEngine("tiny", str(tiny_model_dir))
    fake.load_tokenizer()
    local = HFPromptTokenizer(tiny_model_dir)
    try:
        for probe in PROBES:
            raw = fake.handle(b"POST", b"/tokenize", json.dumps(probe.tokenize_body("tiny")).encode())
            assert raw.startswith(b"HTTP/1.1 200")
            answer = json.loads(raw.partition(b"\r\n\r\n")[2])
            assert answer["tokens"] == local.encode(probe) and answer["count"] == len(answer["tokens"])
    finally:
        local.close()


@pytest.fixture()
def served(fake: FakeEngine) -> Iterator[str]:
    with fake_engine_in_thread(fake) as url:
        yield url


def test_served_over_http_keep_alive_and_pipelining(served: str, fake: FakeEngine) -> None:
    with httpx.Client(base_url=served, timeout=2) as client:
        for _ in range(3):  # one kept-alive connection
            assert client.get("/health").status_code == 200
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            events = [line for line in resp.iter_lines() if line]
        assert resp.status_code == 200 and len(events) == 5 and events[-1] == "data: [DONE]"
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}
        assert client.post("/v1/chat/completions", json=big).json()["usage"]["prompt_tokens"] > 70_000
    # Two requests in one write, the second split across writes, then a connection: close.
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        payload = b'{"prompt": "x"}'
        second = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
            len(payload), payload)  # fmt: skip
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" + second[:30])
        sock.sendall(second[30:])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2 and received.endswith(b'"prompt_logprobs":null}')
