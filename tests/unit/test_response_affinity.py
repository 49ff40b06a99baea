"""The response id -> engine map, and reading the id out of Responses API bodies as they pass."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.proxy.response_affinity import MAX_ID_CHARS, ResponseAffinity
from gateway.proxy.usage import UsageTap, cached_tokens
from gateway.types import EngineId

A, B = EngineId("engine-0"), EngineId("engine-1")

# --- the map ---------------------------------------------------------------------------------------


def test_remembers_and_overwrites() -> None:
    affinity = ResponseAffinity(capacity=10)
    affinity.remember("resp_1", A)
    affinity.remember("resp_2", B)
    assert affinity.engine_for("resp_1") == A and affinity.engine_for("resp_2") == B
    affinity.remember("resp_1", B)
    assert affinity.engine_for("resp_1") == B
    assert len(affinity) == 2
    assert affinity.engine_for("resp_3") is None


def test_bounded_least_recently_used_go_first() -> None:
    affinity = ResponseAffinity(capacity=3)
    for i in range(3):
        affinity.remember(f"resp_{i}", A)
    assert affinity.engine_for("resp_0") == A  # used: now the most recent
    affinity.remember("resp_3", B)
    assert len(affinity) == 3
    assert "resp_1" not in affinity  # the least recently used went
    assert [affinity.engine_for(f"resp_{i}") for i in (0, 2, 3)] == [A, A, B]
    for i in range(4, 1000):
        affinity.remember(f"resp_{i}", B)
    assert len(affinity) == 3
    assert [i for i in range(1000) if f"resp_{i}" in affinity] == [997, 998, 999]


@pytest.mark.parametrize("value", [None, 7, ["resp_1"], {"id": "resp_1"}, ""])
def test_lookups_of_anything_but_a_known_id_are_none(value: Any) -> None:
    affinity = ResponseAffinity()
    affinity.remember("resp_1", A)
    assert affinity.engine_for(value) is None


def test_empty_and_absurd_ids_are_not_stored() -> None:
    affinity = ResponseAffinity()
    affinity.remember("", A)
    affinity.remember("x" * (MAX_ID_CHARS + 1), A)
    affinity.remember("x" * MAX_ID_CHARS, A)
    assert len(affinity) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ResponseAffinity(capacity=0)


# --- the id read from bodies --------------------------------------------------------------------

RESPONSE_USAGE = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 32}, "output_tokens": 8,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 48}  # fmt: skip
RESPONSE = {"id": "resp_abc123", "object": "response", "created_at": 1, "model": "m", "status": "completed",
            "output": [{"type": "message", "id": "msg_1", "content": [{"type": "output_text", "text": "hi"}]}],
            "usage": RESPONSE_USAGE}  # fmt: skip


def event(kind: str, payload: dict[str, Any]) -> bytes:
    # vLLM's Responses API events: an `event:` line, then the data.
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


STREAM = b"".join([
    event("response.created", {"sequence_number": 0, "response": {**RESPONSE, "status": "in_progress",
                                                                   "output": [], "usage": None}}),
    event("response.in_progress", {"sequence_number": 1, "response": {**RESPONSE, "status": "in_progress",
                                                                      "output": [], "usage": None}}),
    event("response.output_text.delta", {"sequence_number": 2, "item_id": "msg_1", "delta": 'say "usage"'}),
    event("response.completed", {"sequence_number": 3, "response": RESPONSE}),
])  # fmt: skip


def splits(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def run(tap: UsageTap, chunks: list[bytes]) -> bytes:
    return b"".join(tap.feed(c) for c in chunks) + tap.finish()


class Recorder:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, response_id: str) -> None:
        self.ids.append(response_id)


def test_json_body_id_and_usage_at_every_split() -> None:
    body = json.dumps(RESPONSE).encode()
    for cut in range(1, len(body), 7):
        seen = Recorder()
        tap = UsageTap(event_stream=False, strip_usage_event=False, on_response_id=seen)
        assert run(tap, splits(body, cut)) == body
        assert seen.ids == ["resp_abc123"], cut
        assert tap.usage is not None and tap.usage["prompt_tokens"] == 40 and tap.usage["completion_tokens"] == 8
        assert cached_tokens(tap.usage) == 32


def test_sse_id_at_every_split_point_and_bytes_unchanged() -> None:
    for cut in range(1, len(STREAM)):
        seen = Recorder()
        tap = UsageTap(event_stream=True, strip_usage_event=False, on_response_id=seen)
        chunks = splits(STREAM, cut)
        outputs = [tap.feed(c) for c in chunks]
        assert outputs == chunks, cut  # forwarded as they come
        assert tap.finish() == b""
        assert seen.ids == ["resp_abc123"], cut  # once, from response.created
        assert tap.usage is not None and cached_tokens(tap.usage) == 32, cut


def test_sse_id_is_known_as_soon_as_response_created_passes() -> None:
    seen = Recorder()
    tap = UsageTap(event_stream=True, strip_usage_event=False, on_response_id=seen)
    first = STREAM[: STREAM.index(b"event: response.in_progress")]
    tap.feed(first)
    assert seen.ids == ["resp_abc123"]
    assert tap.usage is None  # response.created has usage: null


def test_sse_created_event_without_usage_key_still_gives_the_id() -> None:
    stream = event("response.created", {"response": {"id": "resp_x", "status": "queued"}})
    seen = Recorder()
    run(UsageTap(event_stream=True, strip_usage_event=False, on_response_id=seen), [stream])
    assert seen.ids == ["resp_x"]


def test_stream_ending_without_blank_line_is_read_at_finish() -> None:
    stream = event("response.completed", {"response": RESPONSE}).rstrip(b"\n")
    seen = Recorder()
    tap = UsageTap(event_stream=True, strip_usage_event=False, on_response_id=seen)
    assert run(tap, [stream]) == stream
    assert seen.ids == ["resp_abc123"]


def test_oversized_json_body_gives_its_leading_id() -> None:
    body = json.dumps({**RESPONSE, "output": [{"text": "x" * (5 * 1024 * 1024)}]}).encode()
    seen = Recorder()
    tap = UsageTap(event_stream=False, strip_usage_event=False, on_response_id=seen)
    run(tap, splits(body, *range(1000, len(body), 1024 * 1024)))  # past 4 MiB, chunks are not kept
    assert seen.ids == ["resp_abc123"]
    assert tap.usage is None  # not parsed past the cap


@pytest.mark.parametrize("body", [b'{"error": {"message": "bad", "code": 400}}', b"not json", b'{"id": 7}', b""])
def test_bodies_without_an_id_give_none(body: bytes) -> None:
    seen = Recorder()
    tap = UsageTap(event_stream=False, strip_usage_event=False, on_response_id=seen)
    assert run(tap, [body]) == body
    assert seen.ids == [] and tap.response_id is None


def test_without_a_callback_no_id_is_read() -> None:
    chat = json.dumps({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3}}).encode()
    tap = UsageTap(event_stream=False, strip_usage_event=False)
    run(tap, [chat])
    assert tap.response_id is None
    tap = UsageTap(event_stream=True, strip_usage_event=False)
    run(tap, [STREAM])
    assert tap.response_id is None and tap.usage is None


def test_ids_the_gateway_names_say_their_engine_to_any_gateway_process() -> None:
    fleet = [EngineId("engine-0"), EngineId("engine-1"), EngineId("b")]
    named = ResponseAffinity.new_id(EngineId("engine-1"))
    assert named.startswith("resp_") and len(named) <= 64
    # Another worker or replica, which never saw the response: the id alone tells.
    elsewhere = ResponseAffinity(fleet=lambda: fleet)
    assert elsewhere.engine_for(named) == "engine-1"
    assert elsewhere.engine_for(ResponseAffinity.new_id(EngineId("b"))) == "b"
    assert elsewhere.engine_for(ResponseAffinity.new_id(EngineId("gone"))) is None
    assert elsewhere.engine_for("resp_" + "0" * 32) is None  # an engine's own id: unknown
