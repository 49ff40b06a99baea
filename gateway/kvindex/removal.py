"""Dropping an engine's entries from the index, in time proportional to its own entries and
off the request path: when it left the configuration, restarted, cleared its cache, or its
events showed a gap that could not be filled.

The keys it holds are known without scanning the index: those its KV events stored (the
ingestor's map of its blocks) and those routed to it lately (its working set), which cover what
the gateway wrote for it itself. They are evicted in batches, the event loop serving requests
between two. A key the engine stores again meanwhile (a restarted engine prefilling the same
prompt) is spared. An entry written with a TTL that is in neither set (routed there before the
working-set window, or learned from a report) expires on its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

from gateway.kvindex.base import ChunkIndex
from gateway.tasks import cancel_and_wait
from gateway.types import EngineId, RequestChunkKey

# Keys per step: a few milliseconds of the event loop (3.4-5.8 µs a key on a busy 2-core
# machine, bench.index: ~3.5-6 ms a step).
BATCH_KEYS = 1024


class EngineDrops:
    def __init__(self, index: ChunkIndex, *, batch_keys: int = BATCH_KEYS) -> None:
        self._index = index
        self._batch_keys = batch_keys
        self._pending: dict[EngineId, dict[RequestChunkKey, None]] = {}  # in order, once each
        self._tasks: dict[EngineId, asyncio.Task[None]] = {}

    def drop(self, engine: EngineId, keys: Iterable[RequestChunkKey]) -> None:
        """Evict `keys` for `engine`, every tier, soon (at once without a running event loop)."""
        pending = self._pending.setdefault(engine, {})
        pending.update(dict.fromkeys(keys))
        if engine in self._tasks:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._evict(engine, list(self._pending.pop(engine)))
            return
        self._tasks[engine] = loop.create_task(self._run(engine), name=f"index-drop-{engine}")

    def spare(self, engine: EngineId, keys: Iterable[RequestChunkKey]) -> None:
        """`engine` holds these (again): not to be dropped."""
        pending = self._pending.get(engine)
        if pending:
            for key in keys:
                pending.pop(key, None)

    async def wait(self, engine: EngineId) -> None:
        task = self._tasks.get(engine)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        await cancel_and_wait(self._tasks.values())

    async def _run(self, engine: EngineId) -> None:
        pending = self._pending[engine]
        try:
            while pending:
                batch = list(itertools.islice(pending, self._batch_keys))
                for key in batch:
                    del pending[key]
                self._evict(engine, batch)
                await asyncio.sleep(0)
        finally:
            self._pending.pop(engine, None)
            self._tasks.pop(engine, None)

    def _evict(self, engine: EngineId, keys: list[RequestChunkKey]) -> None:
        self._index.evict_all_tiers(engine, keys)


async def drop_engine(
    index: ChunkIndex, engine: EngineId, keys: Iterable[RequestChunkKey], *, batch_keys: int = BATCH_KEYS
) -> None:
    """Drop `keys` for `engine` and wait until done."""
    drops = EngineDrops(index, batch_keys=batch_keys)
    drops.drop(engine, keys)
    await drops.wait(engine)
