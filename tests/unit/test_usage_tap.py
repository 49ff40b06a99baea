from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gateway.proxy.usage import UsageTap, cached_tokens

USAGE = {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43, "prompt_tokens_details": {"cached_tokens": 32}}


def sse(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def chunk_event(text: str, usage: Any = None, finish: str | None = None) -> bytes:
    return sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": usage})  # fmt: skip


USAGE_EVENT = sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [], "usage": USAGE})
DONE = sse(b"[DONE]")
EVENTS = [chunk_event("Hel"), chunk_event("lo"), chunk_event("!", finish="length"), USAGE_EVENT, DONE]
STREAM = b"".join(EVENTS)
STRIPPED = b"".join(e for e in EVENTS if e is not USAGE_EVENT)


def run(tap: UsageTap, chunks: list[bytes]) -> bytes:
    return b"".join(tap.feed(c) for c in chunks) + tap.finish()


def splits(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# --- non-streamed JSON -------------------------------------------------------------------------


def test_json_body_usage_is_extracted_and_bytes_pass_through() -> None:
    body = json.dumps({"id": "x", "choices": [{"text": "hi"}], "usage": USAGE}).encode()
    tap = UsageTap(event_stream=False, strip_usage_event=False)
    out = run(tap, splits(body, 5, 17, 40))
    assert out == body
    assert tap.usage == USAGE
    assert cached_tokens(tap.usage) == 32


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"usage": "none"}', b'{"id": "x"}', b""])
def test_json_body_without_usable_usage(body: bytes) -> None:
    tap = UsageTap(event_stream=False, strip_usage_event=False)
    assert run(tap, [body]) == body
    assert tap.usage is None


# --- event stream, not stripping -----------------------------------------------------------------


def test_sse_passthrough_is_identical_and_reads_final_usage() -> None:
    tap = UsageTap(event_stream=True, strip_usage_event=False)
    assert run(tap, [STREAM]) == STREAM
    assert tap.usage == USAGE


def test_sse_passthrough_at_every_split_point() -> None:
    for cut in range(1, len(STREAM)):
        tap = UsageTap(event_stream=True, strip_usage_event=False)
        chunks = splits(STREAM, cut)
        outputs = [tap.feed(c) for c in chunks]
        assert outputs == chunks, cut  # forwarded as they come, not delayed
        assert b"".join(outputs) + tap.finish() == STREAM, cut
        assert tap.usage == USAGE, cut


def test_sse_passthrough_reads_continuous_usage_stats() -> None:
    usage_1 = {**USAGE, "completion_tokens": 1}
    stream = chunk_event("a", usage=usage_1) + chunk_event("b", usage=USAGE) + DONE
    tap = UsageTap(event_stream=True, strip_usage_event=False)
    assert run(tap, splits(stream, 7, 100)) == stream
    assert tap.usage == USAGE  # the last one seen


def test_sse_passthrough_without_usage() -> None:
    stream = chunk_event("a") + chunk_event("b") + DONE
    tap = UsageTap(event_stream=True, strip_usage_event=False)
    assert run(tap, [stream]) == stream
    assert tap.usage is None


def test_sse_passthrough_never_repeats_bytes_of_an_unterminated_tail() -> None:
    # Everything `feed` returned was already sent to the client: `finish` must not send the
    # bytes after the last blank line a second time (a stream cut short, or using CRLF).
    for stream in (STREAM + b"data: {\"partial", b"data: a\r\n\r\ndata: b\r\n\r\n"):
        tap = UsageTap(event_stream=True, strip_usage_event=False)
        assert run(tap, splits(stream, 10)) == stream


# --- event stream, stripping the usage event ------------------------------------------------------


def test_strip_removes_only_the_usage_only_event() -> None:
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    assert run(tap, [STREAM]) == STRIPPED
    assert tap.usage == USAGE
    assert cached_tokens(tap.usage) == 32


def test_strip_at_every_split_point() -> None:
    for cut in range(1, len(STREAM)):
        tap = UsageTap(event_stream=True, strip_usage_event=True)
        assert run(tap, splits(STREAM, cut)) == STRIPPED, cut
        assert tap.usage == USAGE, cut


def test_strip_at_every_pair_of_split_points() -> None:
    # Two cuts: an event can span three chunks, and a chunk can hold several events.
    for first in range(1, len(STREAM), 23):
        for second in range(first + 1, len(STREAM)):
            tap = UsageTap(event_stream=True, strip_usage_event=True)
            assert run(tap, splits(STREAM, first, second)) == STRIPPED, (first, second)


def test_strip_with_byte_sized_chunks() -> None:
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    assert run(tap, [STREAM[i : i + 1] for i in range(len(STREAM))]) == STRIPPED
    assert tap.usage == USAGE


def test_strip_with_many_random_split_points() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 8)))
        tap = UsageTap(event_stream=True, strip_usage_event=True)
        assert run(tap, splits(STREAM, *cuts)) == STRIPPED


def test_strip_forwards_complete_events_without_waiting_for_the_end() -> None:
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    first = EVENTS[0]
    assert tap.feed(first + EVENTS[1][:10]) == first
    assert tap.feed(EVENTS[1][10:]) == EVENTS[1]


def test_strip_keeps_events_that_carry_usage_and_choices() -> None:
    # continuous_usage_stats: every chunk has usage and choices; nothing is removed.
    stream = chunk_event("a", usage=USAGE) + chunk_event("b", usage=USAGE) + DONE
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    assert run(tap, splits(stream, 3, 150)) == stream
    assert tap.usage == USAGE


def test_strip_keeps_events_with_null_usage() -> None:
    stream = chunk_event("a", usage=None) + DONE
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    assert run(tap, [stream]) == stream
    assert tap.usage is None


def test_strip_usage_event_without_trailing_blank_line() -> None:
    stream = EVENTS[0] + USAGE_EVENT.rstrip(b"\n")
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    assert run(tap, splits(stream, 20)) == EVENTS[0]
    assert tap.usage == USAGE


def test_strip_keeps_an_unterminated_ordinary_tail() -> None:
    stream = EVENTS[0] + b"data: [DONE]"
    tap = UsageTap(event_stream=True, strip_usage_event=True)
    assert run(tap, [stream]) == stream


# --- cached_tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (USAGE, 32),
        ({"prompt_tokens_details": {"cached_tokens": 0}}, 0),
        ({"prompt_tokens": 10}, None),
        ({"prompt_tokens_details": None}, None),
        ({"prompt_tokens_details": {"cached_tokens": "5"}}, None),
        ({"prompt_tokens_details": {}}, None),
        ({}, None),
        (None, None),
    ],
)
def test_cached_tokens(usage: dict[str, Any] | None, expected: int | None) -> None:
    assert cached_tokens(usage) == expected
