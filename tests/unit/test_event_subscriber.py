from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgpack
import pytest
import zmq
import zmq.asyncio

from engine_adapter.events.model import ChunkStored, EventBatch
from engine_adapter.events.subscriber import EventSource, EventSubscriber, resolve_bind_address

T = TypeVar("T")
END_SEQ = (-1).to_bytes(8, "big", signed=True)
TOPIC = b"kv-events"


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []  # ("apply", seq) / ("reset", reason)
        self.batches: list[EventBatch] = []

    def apply(self, engine_id: str, batch: EventBatch) -> None:
        assert engine_id == "e1"
        self.calls.append(("apply", batch.seq))
        self.batches.append(batch)

    def reset(self, engine_id: str, reason: str) -> None:
        assert engine_id == "e1"
        self.calls.append(("reset", reason))

    @property
    def applied_seqs(self) -> list[int]:
        return [seq for kind, seq in self.calls if kind == "apply"]

    @property
    def num_resets(self) -> int:
        return sum(1 for kind, _ in self.calls if kind == "reset")


def payload(seq: int) -> bytes:
    """A vLLM-shaped batch whose single event identifies the sequence number it was sent with."""
    event = {"type": "BlockStored", "block_hashes": [seq], "parent_block_hash": None, "token_ids": [seq] * 4,
             "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": None}  # fmt: skip
    return msgpack.packb([float(seq), [event], 0])


def frames(seq: int, body: bytes | None = None) -> list[bytes]:
    return [TOPIC, seq.to_bytes(8, "big"), payload(seq) if body is None else body]


def run(factory: Callable[[zmq.asyncio.Context], Awaitable[T]]) -> T:
    """Run a coroutine with a fresh zmq.asyncio context, closed afterwards."""

    async def main() -> T:
        context = zmq.asyncio.Context()
        try:
            return await asyncio.wait_for(factory(context), 10)
        finally:
            context.destroy(linger=0)

    return asyncio.run(main())


def subscriber(context: zmq.asyncio.Context, sink: RecordingSink, replay: str | None = None,
               timeout_s: float = 2.0) -> EventSubscriber:  # fmt: skip
    return EventSubscriber(EventSource("e1", "tcp://127.0.0.1:1", replay), sink, context, replay_timeout_s=timeout_s)


# --- handle_frames: ordering, gaps, restarts ------------------------------------------------


def test_in_order_batches_are_applied() -> None:
    sink = RecordingSink()
    seen: list[int] = []

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        sub = EventSubscriber(EventSource("e1", "tcp://127.0.0.1:1"), sink, context,
                              on_batch=lambda engine, batch: seen.append(batch.seq))  # fmt: skip
        for seq in range(5):
            await sub.handle_frames(frames(seq))
        return sub

    sub = run(go)
    assert sink.calls == [("apply", s) for s in range(5)]
    assert seen == [0, 1, 2, 3, 4]
    assert sub.last_seq == 4 and sub.num_batches == 5 and sub.num_resets == 0
    # The decoded batch reached the sink, not just its number.
    event = sink.batches[2].events[0]
    assert isinstance(event, ChunkStored) and event.block_hashes == (2,)


def test_first_batch_may_start_anywhere() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> None:
        sub = subscriber(context, sink)
        await sub.handle_frames(frames(41))
        await sub.handle_frames(frames(42))

    run(go)
    assert sink.calls == [("apply", 41), ("apply", 42)]


def test_gap_without_replay_endpoint_resets_then_applies_new_batch() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        sub = subscriber(context, sink)
        await sub.handle_frames(frames(1))
        await sub.handle_frames(frames(4))  # 2 and 3 were lost
        await sub.handle_frames(frames(5))
        return sub

    sub = run(go)
    kinds = [kind for kind, _ in sink.calls]
    assert kinds == ["apply", "reset", "apply", "apply"]
    assert sink.applied_seqs == [1, 4, 5]
    assert sub.num_resets == 1 and sub.last_seq == 5


@pytest.mark.parametrize("restart_seq", [0, 3], ids=["back-to-zero", "repeat-last"])
def test_sequence_going_back_resets(restart_seq: int) -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        sub = subscriber(context, sink)
        for seq in (1, 2, 3):
            await sub.handle_frames(frames(seq))
        await sub.handle_frames(frames(restart_seq))
        await sub.handle_frames(frames(restart_seq + 1))
        return sub

    sub = run(go)
    assert [kind for kind, _ in sink.calls] == ["apply"] * 3 + ["reset", "apply", "apply"]
    assert sink.applied_seqs == [1, 2, 3, restart_seq, restart_seq + 1]
    assert sub.last_seq == restart_seq + 1 and sub.num_resets == 1


def test_undecodable_payload_resets_and_stream_continues() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        sub = subscriber(context, sink)
        await sub.handle_frames(frames(1))
        await sub.handle_frames(frames(2, b"\xc1 garbage"))
        await sub.handle_frames(frames(3))  # follows the bad batch: no gap, no second reset
        return sub

    sub = run(go)
    assert [kind for kind, _ in sink.calls] == ["apply", "reset", "apply"]
    assert sink.applied_seqs == [1, 3]
    assert sub.num_resets == 1 and sub.num_batches == 2 and sub.last_seq == 3


def test_wrong_number_of_frames_is_ignored() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        sub = subscriber(context, sink)
        await sub.handle_frames(frames(1))
        await sub.handle_frames([(2).to_bytes(8, "big"), payload(2)])
        await sub.handle_frames(frames(2))
        return sub

    sub = run(go)
    assert sink.calls == [("apply", 1), ("apply", 2)]


# --- gap filling from a real ZMQ ROUTER, as vLLM's ZmqEventPublisher serves replays ----------


class ReplayServer:
    """vLLM's `ZmqEventPublisher._service_replay`: answer [client, b"", start] with every
    buffered batch whose seq >= start as (client, b"", topic, seq, payload), then the end
    marker (client, b"", b"", -1, b"")."""

    def __init__(self, context: zmq.asyncio.Context, buffer: list[tuple[int, bytes]]) -> None:
        self.buffer = buffer
        self.requests: list[int] = []
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            request = await self.socket.recv_multipart()
            if len(request) != 3:
                continue
            client_id, _, start_bytes = request
            start = int.from_bytes(start_bytes, "big")
            self.requests.append(start)
            for seq, buf in self.buffer:
                if seq >= start:
                    await self.socket.send_multipart((client_id, b"", TOPIC, seq.to_bytes(8, "big"), buf))
            await self.socket.send_multipart((client_id, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.socket.close(linger=0)


def test_gap_is_filled_from_replay_socket() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> tuple[EventSubscriber, list[int]]:
        # The engine's replay buffer holds batches 1..8 (it has published 8 already).
        server = ReplayServer(context, [(s, payload(s)) for s in range(1, 9)])
        try:
            sub = subscriber(context, sink, server.endpoint)
            await sub.handle_frames(frames(1))
            await sub.handle_frames(frames(2))
            await sub.handle_frames(frames(6))  # 3, 4, 5 lost
            await sub.handle_frames(frames(7))
            return sub, server.requests
        finally:
            await server.close()

    sub, requests = run(go)
    assert requests == [3]  # asked for the first missing batch
    assert sink.calls == [("apply", s) for s in range(1, 8)]  # 8 (beyond the gap) not applied early
    assert sub.num_resets == 0 and sub.last_seq == 7
    # The replayed batches are the real payloads, decoded.
    assert [b.events[0].block_hashes for b in sink.batches] == [(s,) for s in range(1, 8)]  # type: ignore[union-attr]


def test_replay_that_no_longer_has_the_first_missing_batch_resets() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        # The buffer rolled over: 3 is gone, 4 and 5 remain.
        server = ReplayServer(context, [(s, payload(s)) for s in range(4, 7)])
        try:
            sub = subscriber(context, sink, server.endpoint)
            await sub.handle_frames(frames(2))
            await sub.handle_frames(frames(6))
            return sub
        finally:
            await server.close()

    sub = run(go)
    assert [kind for kind, _ in sink.calls] == ["apply", "reset", "apply"]
    assert sink.applied_seqs == [2, 6]
    assert sub.num_resets == 1


def test_replay_that_does_not_answer_resets() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        silent = context.socket(zmq.ROUTER)  # accepts the request, never answers
        silent.setsockopt(zmq.LINGER, 0)
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        try:
            sub = subscriber(context, sink, f"tcp://127.0.0.1:{port}", timeout_s=0.2)
            await sub.handle_frames(frames(1))
            await sub.handle_frames(frames(3))
            return sub
        finally:
            silent.close(linger=0)

    sub = run(go)
    assert [kind for kind, _ in sink.calls] == ["apply", "reset", "apply"]
    assert sub.num_resets == 1 and sub.last_seq == 3


# --- end to end: start() on a real PUB socket ----------------------------------------------


def test_start_subscribes_to_a_pub_socket() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> EventSubscriber:
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub = EventSubscriber(EventSource("e1", f"tcp://127.0.0.1:{port}"), sink, context)
        sub.start()
        try:
            # Slow joiner: messages sent before the subscription lands are dropped, so keep
            # re-sending batch 0 (a repeat would read as a restart) until one arrives.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not sink.calls:
                assert loop.time() < deadline, "subscriber never received a message"
                await pub.send_multipart(frames(0))
                await asyncio.sleep(0.02)
            for seq in (1, 2, 3):
                await pub.send_multipart(frames(seq))
            while sub.last_seq != 3:
                assert loop.time() < deadline, f"stuck at {sub.last_seq}"
                await asyncio.sleep(0.01)
            return sub
        finally:
            await sub.stop()
            pub.close(linger=0)

    sub = run(go)
    # Extra copies of batch 0 that were in flight read as restarts (reset, then applied); after
    # the last of them the in-order batches follow with no reset in between.
    assert sink.calls[-4:] == [("apply", 0), ("apply", 1), ("apply", 2), ("apply", 3)]
    assert set(sink.applied_seqs[:-3]) == {0}
    assert sub.num_batches == len(sink.applied_seqs)
    assert sub._task is None  # stop() ended the task


def test_a_bad_message_does_not_end_the_subscription() -> None:
    sink = RecordingSink()

    async def go(context: zmq.asyncio.Context) -> None:
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub = EventSubscriber(EventSource("e1", f"tcp://127.0.0.1:{port}"), sink, context)
        sub.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not sink.calls:
                assert loop.time() < deadline
                await pub.send_multipart(frames(0))
                await asyncio.sleep(0.02)
            # A sequence frame of the wrong size makes handle_frames raise.
            await pub.send_multipart([TOPIC, b"\x01", payload(1)])
            await pub.send_multipart(frames(1))
            while sub.last_seq != 1:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
        finally:
            await sub.stop()
            pub.close(linger=0)

    run(go)
    assert sink.applied_seqs[-1] == 1


# --- resolve_bind_address --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "engine_url", "expected"),
    [
        ("tcp://*:5557", "http://engine-1:8000", "tcp://engine-1:5557"),
        ("tcp://0.0.0.0:5558", "http://10.0.0.7:8000/v1", "tcp://10.0.0.7:5558"),
        ("tcp://*:5557", "https://gpu-host.internal", "tcp://gpu-host.internal:5557"),
        ("tcp://10.1.2.3:5557", "http://engine-1:8000", "tcp://10.1.2.3:5557"),  # already concrete
        ("tcp://localhost:6000", "http://engine-1:8000", "tcp://localhost:6000"),
        ("ipc:///tmp/kv.sock", "http://engine-1:8000", "ipc:///tmp/kv.sock"),
    ],
)
def test_resolve_bind_address(endpoint: str, engine_url: str, expected: str) -> None:
    assert resolve_bind_address(endpoint, engine_url) == expected
