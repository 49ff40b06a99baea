"""Subscribe to one engine's KV-event stream over ZMQ, in order, with gap handling.

Sequence numbers are tracked per engine. A gap (missed batches) is filled from the engine's
replay socket when one is configured; if it is not, or the replay cannot cover the gap, the
engine's entries are dropped (`EventSink.reset`) so routing never trusts stale state. A
sequence that goes backwards means the engine restarted with an empty cache: reset too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from engine_adapter.events.decoder import EventDecodeError, decode_batch, decode_seq
from engine_adapter.events.model import EventBatch

logger = logging.getLogger(__name__)

END_OF_REPLAY = -1


class EventSink(Protocol):
    def apply(self, engine_id: str, batch: EventBatch) -> None: ...

    def reset(self, engine_id: str, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class EventSource:
    engine_id: str
    endpoint: str  # tcp://host:port of the PUB socket
    replay_endpoint: str | None = None  # tcp://host:port of the ROUTER socket
    topic: str = ""  # "" receives every topic


def resolve_bind_address(endpoint: str, engine_url: str) -> str:
    """Engines report what they bind (tcp://*:5557); subscribers need the engine's host."""
    if "://*" not in endpoint and "://0.0.0.0" not in endpoint:
        return endpoint
    host = urlsplit(engine_url).hostname or "127.0.0.1"
    port = endpoint.rsplit(":", 1)[1]
    return f"tcp://{host}:{port}"


class EventSubscriber:
    def __init__(
        self,
        source: EventSource,
        sink: EventSink,
        context: zmq.asyncio.Context,
        *,
        replay_timeout_s: float = 2.0,
        on_batch: Callable[[str, EventBatch], None] | None = None,
    ) -> None:
        self.source = source
        self._sink = sink
        self._context = context
        self._replay_timeout_s = replay_timeout_s
        self._on_batch = on_batch
        self.last_seq: int | None = None
        self.num_batches = 0
        self.num_resets = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.source.engine_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.setsockopt_string(zmq.SUBSCRIBE, self.source.topic)
        socket.connect(self.source.endpoint)
        try:
            while True:
                frames = await socket.recv_multipart()
                try:
                    await self.handle_frames(frames)
                except Exception:  # a bad message must not end the subscription
                    logger.exception("engine %s: failed to handle a KV-event message", self.source.engine_id)
        finally:
            socket.close(linger=0)

    async def handle_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            logger.warning("engine %s: KV-event message with %d frames", self.source.engine_id, len(frames))
            return
        seq = decode_seq(frames[1])
        if self.last_seq is not None:
            if seq <= self.last_seq:
                self._reset(f"sequence went back from {self.last_seq} to {seq} (engine restart)")
            elif seq > self.last_seq + 1:
                await self._fill_gap(self.last_seq + 1, seq)
        self._deliver(seq, frames[2])

    def _deliver(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(seq, payload)
        except EventDecodeError as exc:
            # We cannot know what this batch changed: treat it like a gap we cannot fill.
            self._reset(f"undecodable batch {seq}: {exc}")
            self.last_seq = seq
            return
        self._sink.apply(self.source.engine_id, batch)
        self.last_seq = seq
        self.num_batches += 1
        if self._on_batch is not None:
            self._on_batch(self.source.engine_id, batch)

    def _reset(self, reason: str) -> None:
        logger.warning("engine %s: dropping its index entries: %s", self.source.engine_id, reason)
        self.num_resets += 1
        self._sink.reset(self.source.engine_id, reason)

    async def _fill_gap(self, first_missing: int, next_seq: int) -> None:
        if self.source.replay_endpoint is None:
            self._reset(f"missed batches {first_missing}..{next_seq - 1} and no replay endpoint")
            return
        replayed = await self._replay(first_missing, next_seq)
        if replayed is None or not replayed or replayed[0][0] != first_missing:
            self._reset(f"replay could not cover batches {first_missing}..{next_seq - 1}")
            return
        for seq, payload in replayed:
            self._deliver(seq, payload)

    async def _replay(self, start: int, stop: int) -> list[tuple[int, bytes]] | None:
        """Ask the engine's ROUTER socket for batches [start, stop); None on failure."""
        assert self.source.replay_endpoint is not None
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.source.replay_endpoint)
        batches: list[tuple[int, bytes]] = []
        try:
            await socket.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(socket.recv_multipart(), self._replay_timeout_s)
                # ROUTER → DEALER: b"", topic, seq, payload
                if len(frames) != 4:
                    return None
                seq = decode_seq(frames[2])
                if seq == END_OF_REPLAY:
                    return batches
                if start <= seq < stop:
                    batches.append((seq, frames[3]))
        except (asyncio.TimeoutError, zmq.ZMQError, EventDecodeError) as exc:
            logger.warning("engine %s: replay failed: %s", self.source.engine_id, exc)
            return None
        finally:
            socket.close(linger=0)
