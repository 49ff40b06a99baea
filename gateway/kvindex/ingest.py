"""Apply engines' KV events to the index, bridging the two key spaces.

Engines name blocks by their own hash (`EngineBlockHash`, depends on the engine's hash
settings); the gateway names chunks by its chained xxhash of token ids (`RequestChunkKey`).
A `ChunkStored` event carries the blocks' token ids and the parent's engine hash, so the
gateway key of each new block is computed from the parent's gateway key and the tokens, and
`engine hash → gateway key` is remembered per engine for the `ChunkRemoved` events, which
carry engine hashes only. The only setting that must match the engine is the block size.

Chunks an engine writes to a shared store (`engines[].kv_store`; any medium but `GPU`) are
chunked by the store (LMCache: 256 tokens), a multiple of the block size: each store chunk
becomes that many gateway keys, recorded for the store's pseudo-holder (gateway.kvindex.stores)
under the `STORAGE` tier, and its hash is remembered per store, not per engine, since a chunk's
parent may have been written by another engine attached to the same store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

from engine_adapter.events.model import AllChunksCleared, ChunkRemoved, ChunkStored, EngineBlockHash, EventBatch
from gateway.kvindex.base import TIER_GPU, TIER_STORAGE, ChunkIndex
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.removal import EngineDrops
from gateway.kvindex.stores import StoreWrites, store_holder
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.types import EngineId, RequestChunkKey

logger = logging.getLogger(__name__)

# Store chunk hashes remembered per store (each with its gateway keys), oldest forgotten first:
# ~500 B each with 8 keys, so at most ~35 MB a store; 16.7M tokens of 256-token chunks.
MAX_STORE_CHUNKS = 1 << 16


@dataclass(slots=True)
class IngestStats:
    blocks_stored: int = 0
    blocks_removed: int = 0
    orphan_blocks: int = 0  # parent unknown: stored before we subscribed, or lost
    block_size_mismatches: int = 0
    resets: int = 0


class IndexIngestor:
    """An `EventSink` for `engine_adapter.events.subscriber`."""

    def __init__(
        self,
        index: ChunkIndex,
        layout: KVLayout,
        model_of: Callable[[EngineId], str | None],
        on_reset: Callable[[EngineId, str], None] | None = None,
        drops: EngineDrops | None = None,
        on_stored: Callable[[EngineId, list[RequestChunkKey]], None] | None = None,
        store_of: Callable[[EngineId], str | None] | None = None,
    ) -> None:
        """`drops` evicts what an engine that reset held, in batches off the request path
        (gateway.kvindex.removal); without it, at once. `on_stored` hears of the blocks an
        engine stored in its own memory (the working sets: with several workers, each learns
        there what the others routed). `store_of` names the shared store an engine is attached
        to (None: none); its non-GPU events are that store's."""
        self._index = index
        self.drops = drops or EngineDrops(index)
        self._layout = layout
        self._model_of = model_of
        self._on_reset = on_reset
        self._on_stored = on_stored
        self._store_of = store_of
        # store -> its chunks' hashes -> their gateway keys (block-size chunks), oldest first.
        self._store_keys: dict[str, dict[EngineBlockHash, tuple[RequestChunkKey, ...]]] = {}
        self.store_writes = StoreWrites(MAX_STORE_CHUNKS)
        self._keys: dict[EngineId, dict[EngineBlockHash, RequestChunkKey]] = {}
        # The mapping lives while any tier of the engine holds the block: how many tiers beyond
        # the first hold it, for the blocks more than one tier holds (most are in one: no entry).
        self._more_tiers: dict[EngineId, dict[EngineBlockHash, int]] = {}
        self.stats = IngestStats()

    def apply(self, engine_id: str, batch: EventBatch) -> None:
        engine = EngineId(engine_id)
        for event in batch.events:
            if isinstance(event, ChunkStored):
                self._stored(engine, event)
            elif isinstance(event, ChunkRemoved):
                self._removed(engine, event)
            elif isinstance(event, AllChunksCleared):
                self._clear(engine)

    def reset(self, engine_id: str, reason: str) -> None:
        engine = EngineId(engine_id)
        self.stats.resets += 1
        self._clear(engine)
        if self._on_reset is not None:
            self._on_reset(engine, reason)

    def release(self, engine_id: str) -> list[RequestChunkKey]:
        """Forget `engine` (it left the configuration) and return the gateway keys of the blocks
        its events stored, for the index to drop (gateway.kvindex.removal). O(its blocks)."""
        engine = EngineId(engine_id)
        self._more_tiers.pop(engine, None)
        return list(self._keys.pop(engine, {}).values())

    def known_blocks(self, engine: EngineId) -> int:
        return len(self._keys.get(engine, {}))

    def store_chunks(self, store: str) -> int:
        """How many of its own chunks the store is known to hold."""
        return len(self._store_keys.get(store, {}))

    def _store(self, engine: EngineId, medium: str) -> str | None:
        if medium == TIER_GPU or self._store_of is None:
            return None
        return self._store_of(engine)

    def _stored(self, engine: EngineId, event: ChunkStored) -> None:
        store = self._store(engine, event.medium)
        if store is not None:
            self._store_stored(engine, store, event)
            return
        if event.block_size != self._layout.block_size:
            # The engine's own memory defines its block size (other tiers may chunk differently).
            if event.medium != TIER_GPU or not self._layout.observe(engine, event.block_size):
                self.stats.block_size_mismatches += 1
                return
        mapping = self._keys.setdefault(engine, {})
        if event.parent_block_hash is None:
            model = self._model_of(engine)
            if model is None:
                self.stats.orphan_blocks += len(event.block_hashes)
                return
            parent: int | None = chain_root(model, event.lora_name, event.cache_salt)
        else:
            parent = mapping.get(event.parent_block_hash)
        if parent is None:
            self.stats.orphan_blocks += len(event.block_hashes)
            return
        keys = chunk_keys(event.token_ids, self._layout.block_size, parent)
        hashes = event.block_hashes[: len(keys)]
        if not mapping.keys().isdisjoint(hashes):  # another tier of the engine holds some
            more = self._more_tiers.setdefault(engine, {})
            for engine_hash in hashes:
                if engine_hash in mapping:
                    more[engine_hash] = more.get(engine_hash, 0) + 1
        mapping.update(zip(hashes, keys))
        self.drops.spare(engine, keys)
        self._index.add(engine, keys, event.medium)
        self.stats.blocks_stored += len(keys)
        if self._on_stored is not None and event.medium in (None, TIER_GPU):
            self._on_stored(engine, keys)

    def _store_stored(self, engine: EngineId, store: str, event: ChunkStored) -> None:
        block = self._layout.block_size
        if not block or event.block_size % block:
            self.stats.block_size_mismatches += len(event.block_hashes)
            return
        mapping = self._store_keys.setdefault(store, {})
        parent: int | None
        if event.parent_block_hash is None:
            model = self._model_of(engine)
            parent = None if model is None else chain_root(model, event.lora_name, event.cache_salt)
        else:
            parent_keys = mapping.get(event.parent_block_hash)
            parent = parent_keys[-1] if parent_keys else None
        if parent is None:
            self.stats.orphan_blocks += len(event.block_hashes)
            return
        per_chunk = event.block_size // block
        keys = chunk_keys(event.token_ids, block, parent)
        num_chunks = min(len(event.block_hashes), len(keys) // per_chunk)
        del keys[num_chunks * per_chunk :]
        for i, engine_hash in enumerate(event.block_hashes[:num_chunks]):
            mapping.pop(engine_hash, None)  # written again: the newest
            mapping[engine_hash] = tuple(keys[i * per_chunk : (i + 1) * per_chunk])
        while len(mapping) > MAX_STORE_CHUNKS:
            del mapping[next(iter(mapping))]
        self.store_writes.note(keys[per_chunk - 1 :: per_chunk])
        self._index.add(store_holder(store), keys, TIER_STORAGE)
        self.stats.blocks_stored += len(keys)

    def _store_removed(self, store: str, event: ChunkRemoved) -> None:
        mapping = self._store_keys.get(store, {})
        keys = [key for engine_hash in event.block_hashes for key in mapping.pop(engine_hash, ())]
        self._index.evict(store_holder(store), keys, TIER_STORAGE)
        self.stats.blocks_removed += len(keys)

    def _removed(self, engine: EngineId, event: ChunkRemoved) -> None:
        store = self._store(engine, event.medium)
        if store is not None:
            self._store_removed(store, event)
            return
        mapping = self._keys.get(engine, {})
        more = self._more_tiers.get(engine)
        if not more:  # each block in one tier: its mapping goes
            found = map(mapping.pop, event.block_hashes, repeat(None))
            keys = [key for key in found if key is not None]
        else:
            keys = []
            for engine_hash in event.block_hashes:
                key = mapping.get(engine_hash)
                if key is None:
                    continue
                keys.append(key)
                others = more.pop(engine_hash, 0)
                if others == 0:
                    del mapping[engine_hash]
                elif others > 1:
                    more[engine_hash] = others - 1
        self._index.evict(engine, keys, event.medium)
        self.stats.blocks_removed += len(keys)

    def _clear(self, engine: EngineId) -> None:
        """O(the engine's blocks), in batches: never a scan of the whole index."""
        self._more_tiers.pop(engine, None)
        self.drops.drop(engine, self._keys.pop(engine, {}).values())
