"""Shared KV stores: one tier that every engine attached to the store can load from.

Engines attached to the same store (`engines[].kv_store`, e.g. an LMCache server that each
engine's `LMCacheMPConnector` talks to) announce the chunks they write there as `BlockStored`
events with a medium other than `GPU` and the store's own chunk size (256 tokens for LMCache,
a multiple of the engines' block size). The index records those chunks once, for a
pseudo-holder that names the store (`store_holder`), never for the engine that happened to
write them: with LMCache's fast transfer mode, only the writer announces a chunk, and an
engine that joins later must see what the store already holds.

A lookup then gives each attached engine `max(own run, store run)` chunks: vLLM takes its
local prefix-cache hit first and asks the connector for what follows, and the store answers
from the prompt's start, so the two runs never add up beyond the longer one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.types import TIER_STORAGE, EngineId, PrefixMatch, RequestChunkKey

_HOLDER_PREFIX = "kv-store:"


def store_holder(store: str) -> EngineId:
    """The index's holder id for `store`; not a valid engine name in the configuration."""
    return EngineId(_HOLDER_PREFIX + store)


def is_store_holder(engine: EngineId) -> bool:
    return engine.startswith(_HOLDER_PREFIX)


def with_store_hits(
    matches: dict[EngineId, PrefixMatch], attached: Callable[[], Iterable[tuple[EngineId, str]]]
) -> None:
    """Give every engine attached to a store (`attached()`: (engine, store) pairs, asked only
    when a store holds some of the prefix) the store's run as its `STORAGE` tier, and remove
    the pseudo-holders from `matches`. In place (the dict; its matches are replaced, not changed)."""
    held = {engine: matches.pop(engine) for engine in [e for e in matches if is_store_holder(e)]}
    if not held:
        return
    for engine, store in attached():
        store_match = held.get(store_holder(store))
        if store_match is None or store_match.num_chunks == 0:
            continue
        run = store_match.num_chunks
        own = matches.get(engine)
        if own is None:
            matches[engine] = PrefixMatch(num_chunks=run, by_tier={TIER_STORAGE: run})
            continue
        by_tier = {**own.by_tier, TIER_STORAGE: max(own.by_tier.get(TIER_STORAGE, 0), run)}
        matches[engine] = PrefixMatch(max(own.num_chunks, run), by_tier)  # a new one: matches are shared


class StoreWrites:
    """When each store chunk was last announced, as a count of announcements: an engine's
    report that corrects the store's entries (an eviction nobody announced) must not undo a
    chunk written again after the request was routed, e.g. by that very request. Keeps the
    last key of each chunk, the newest `max_chunks`."""

    def __init__(self, max_chunks: int) -> None:
        self._max_chunks = max_chunks
        self.seq = 0
        self._written: dict[RequestChunkKey, int] = {}

    def note(self, chunk_last_keys: Iterable[RequestChunkKey]) -> None:
        self.seq += 1
        written = self._written
        for key in chunk_last_keys:
            written.pop(key, None)
            written[key] = self.seq
        while len(written) > self._max_chunks:
            del written[next(iter(written))]

    def written_after(self, keys: Iterable[RequestChunkKey], seq: int) -> bool:
        """Whether any chunk ending in one of `keys` was announced after `seq`."""
        written = self._written
        return any(written.get(key, 0) > seq for key in keys)
