"""Dropping an engine that left the configuration from the index, in time proportional to its
own entries and off the request path.

The keys it holds are known without scanning the index: those its KV events stored (the
ingestor's map of its blocks, `IndexIngestor.release`) and those routed to it lately (its working
set, `WorkingSetTracker.forget`), which cover what the gateway wrote for it itself. They are
evicted in batches, the event loop serving requests between two. An entry written with a TTL
that is in neither set (routed there before the working-set window) expires on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from gateway.kvindex.base import ChunkIndex
from gateway.types import (
    TIER_APPROXIMATE,
    TIER_CPU,
    TIER_GPU,
    TIER_REPORTED,
    TIER_SPECULATIVE,
    TIER_STORAGE,
    EngineId,
    RequestChunkKey,
)

TIERS = (TIER_GPU, TIER_CPU, TIER_STORAGE, TIER_SPECULATIVE, TIER_APPROXIMATE, TIER_REPORTED)
# Keys per step: a few milliseconds of the event loop.
BATCH_KEYS = 2048


async def drop_engine(
    index: ChunkIndex, engine: EngineId, keys: Iterable[RequestChunkKey], *, batch_keys: int = BATCH_KEYS
) -> None:
    pending = list(dict.fromkeys(keys))  # once each, in order
    for start in range(0, len(pending), batch_keys):
        batch = pending[start : start + batch_keys]
        for tier in TIERS:
            index.evict(engine, batch, tier)
        await asyncio.sleep(0)
