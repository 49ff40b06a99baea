"""In-memory chunk index for one gateway process, bounded in memory.

Layout: key → {engine → tier bitmask}, an LRU over keys (a lookup refreshes the keys it
matched). When the number of keys exceeds `capacity_chunks`, the least recently used key is
dropped for all engines. Entries written with a TTL (speculative, approximate) expire through
a heap; an entry re-written before expiry gets the later deadline.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from gateway.kvindex.base import TIER_APPROXIMATE, TIER_CPU, TIER_GPU, TIER_SPECULATIVE, TIER_STORAGE, PrefixMatch
from gateway.types import EngineId, RequestChunkKey

_KNOWN_TIERS = (TIER_GPU, TIER_CPU, TIER_STORAGE, TIER_SPECULATIVE, TIER_APPROXIMATE)


class InMemoryIndex:
    def __init__(self, capacity_chunks: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity_chunks
        self._clock = clock
        self._entries: OrderedDict[RequestChunkKey, dict[EngineId, int]] = OrderedDict()
        self._tier_bits: dict[str, int] = {t: 1 << i for i, t in enumerate(_KNOWN_TIERS)}
        self._counts: dict[tuple[EngineId, int], int] = {}
        self._deadlines: dict[tuple[RequestChunkKey, EngineId, int], float] = {}
        self._expiry_heap: list[tuple[float, RequestChunkKey, EngineId, int]] = []

    def _bit(self, tier: str) -> int:
        bit = self._tier_bits.get(tier)
        if bit is None:  # a medium a future engine invents: give it its own bit
            bit = self._tier_bits[tier] = 1 << len(self._tier_bits)
        return bit

    def _tiers(self, mask: int) -> list[str]:
        return [t for t, b in self._tier_bits.items() if mask & b]

    def lookup(
        self, keys: Sequence[RequestChunkKey], engines: Iterable[EngineId] | None = None
    ) -> dict[EngineId, PrefixMatch]:
        self._expire()
        wanted = None if engines is None else set(engines)
        matches: dict[EngineId, PrefixMatch] = {}
        # engine → tiers whose run from chunk 0 is still unbroken (may become 0 while the
        # engine still holds the chunks in some other mix of tiers).
        alive: dict[EngineId, int] | None = None
        for depth, key in enumerate(keys):
            holders = self._entries.get(key)
            if not holders:
                break
            self._entries.move_to_end(key)
            if alive is None:
                alive = {e: m for e, m in holders.items() if wanted is None or e in wanted}
            next_alive: dict[EngineId, int] = {}
            for engine, tiers in alive.items():
                held = holders.get(engine, 0)
                if not held:
                    continue
                match = matches.get(engine)
                if match is None:
                    match = matches[engine] = PrefixMatch()
                match.num_chunks = depth + 1
                still = tiers & held
                for tier in self._tiers(still):
                    match.by_tier[tier] = depth + 1
                next_alive[engine] = still
            if not next_alive:
                break
            alive = next_alive
        return matches

    def add(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str, ttl_s: float | None = None) -> None:
        bit = self._bit(tier)
        deadline = None if ttl_s is None else self._clock() + ttl_s
        for key in keys:
            holders = self._entries.get(key)
            if holders is None:
                holders = self._entries[key] = {}
            else:
                self._entries.move_to_end(key)
            mask = holders.get(engine, 0)
            if not mask & bit:
                holders[engine] = mask | bit
                self._counts[(engine, bit)] = self._counts.get((engine, bit), 0) + 1
            if deadline is not None:
                self._deadlines[(key, engine, bit)] = deadline
                heapq.heappush(self._expiry_heap, (deadline, key, engine, bit))
            elif (key, engine, bit) in self._deadlines:
                del self._deadlines[(key, engine, bit)]  # confirmed: no longer expires
        while len(self._entries) > self._capacity:
            key, holders = self._entries.popitem(last=False)
            for holder, mask in holders.items():
                self._uncount(holder, mask)

    def evict(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str) -> None:
        bit = self._bit(tier)
        for key in keys:
            self._remove(key, engine, bit)

    def clear_engine(self, engine: EngineId) -> None:
        for key in [k for k, holders in self._entries.items() if engine in holders]:
            holders = self._entries[key]
            self._uncount(engine, holders.pop(engine))
            if not holders:
                del self._entries[key]
        self._deadlines = {k: v for k, v in self._deadlines.items() if k[1] != engine}

    def num_chunks(self, engine: EngineId, tier: str = TIER_GPU) -> int:
        self._expire()
        return self._counts.get((engine, self._bit(tier)), 0)

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: RequestChunkKey, engine: EngineId, bit: int) -> None:
        holders = self._entries.get(key)
        if holders is None:
            return
        mask = holders.get(engine, 0)
        if not mask & bit:
            return
        self._uncount(engine, bit)
        if mask == bit:
            del holders[engine]
            if not holders:
                del self._entries[key]
        else:
            holders[engine] = mask & ~bit

    def _uncount(self, engine: EngineId, mask: int) -> None:
        for bit in self._tier_bits.values():
            if mask & bit:
                self._counts[(engine, bit)] -= 1

    def _expire(self) -> None:
        now = self._clock()
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            deadline, key, engine, bit = heapq.heappop(heap)
            if self._deadlines.get((key, engine, bit)) == deadline:
                del self._deadlines[(key, engine, bit)]
                self._remove(key, engine, bit)
