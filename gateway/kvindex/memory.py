"""In-memory chunk index for one gateway process, bounded in memory.

Layout: key → one integer, a bitset of (tier, engine) pairs. Each engine has a slot s; tier
slice t holds bit `t·W + s` (W slots per slice, doubled when the fleet outgrows it). Slice 0
is the union of the tiers ("holds the chunk in any tier"), so a lookup needs no per-engine
work at all while the set of holders does not change:

    runs[i] = entry[key_0] & entry[key_1] & … & entry[key_i]

computed by C loops (`map`, `itertools.accumulate`), then only the positions where `runs`
changes are decoded into engines and tiers. One dictionary step and one AND per block,
whatever the fleet size; fewer ANDs still, as equal bitsets are one object (`_intern`): keys in
a row held by the same engines share one, and `runs` can only change where the object does.

An approximate LRU over keys bounds the memory (`gateway/kvindex/generations.py`): beyond
`capacity_chunks` keys, the keys of the oldest generation are dropped for all engines; adding
a key or matching it in a lookup moves it to the young generation (for a lookup, at the next
add: a lookup only notes what it used). Recency is which plain dict holds a key, so a
lookup normally writes nothing to the tables. Entries written with a TTL (speculative,
approximate) expire through a heap; an entry re-written before expiry gets the later
deadline, but for the keys a run shares with the same (engine, tier)'s run written less than
1/8 of the TTL before (`_not_written_lately`: a conversation's next turn writes its new keys
only).
"""

from __future__ import annotations

import heapq
import itertools
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from gateway.kvindex.base import (
    TIER_APPROXIMATE,
    TIER_CPU,
    TIER_GPU,
    TIER_REPORTED,
    TIER_SPECULATIVE,
    TIER_STORAGE,
    PrefixMatch,
)
from gateway.kvindex.generations import Generations
from gateway.kvindex.runs import RecentRuns
from gateway.types import EngineId, RequestChunkKey

_KNOWN_TIERS = (TIER_GPU, TIER_CPU, TIER_STORAGE, TIER_SPECULATIVE, TIER_APPROXIMATE, TIER_REPORTED)
_ANY = 0  # slice of the union of all tiers
_NONE_EXPIRING: dict[RequestChunkKey, float] = {}  # read only
# Distinct bitsets kept as one object each: a fleet's keys have few (the sets of engines that
# hold a prefix), ~100 B each at 256 engines.
_MAX_INTERNED = 1 << 16
_REWRITE_EVERY = 8  # a run added with a TTL is written whole again after 1/8 of it
_MAX_SHARED_MATCHES = 1 << 16  # one per prefix length: a 1M-token prompt at block 16


class InMemoryIndex:
    def __init__(self, capacity_chunks: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: Generations[RequestChunkKey] = Generations(capacity_chunks)
        self._width = 64  # engine slots per slice
        self._slots: dict[EngineId, int] = {}
        self._engines: list[EngineId] = []
        # The bits of each engine holding a chunk in the GPU tier only (its union and GPU bits):
        # the usual end of a run, decoded with one dictionary step.
        self._gpu_only: dict[int, EngineId] = {}
        # tier name -> slice (1..); slice 0 is the union.
        self._slices: dict[str, int] = {t: i + 1 for i, t in enumerate(_KNOWN_TIERS)}
        self._tier_names: list[str] = ["", *_KNOWN_TIERS]
        self._counts: dict[tuple[int, int], int] = {}  # (slot, slice) -> chunks held
        # Entries that expire: (slot, slice) -> key -> deadline. The heap has one item per
        # `add` (its keys share a deadline), not one per key: a conversation's every turn
        # refreshes all its chunks on an engine without events, and a push per chunk cost more
        # than the rest of routing it.
        self._deadlines: dict[tuple[int, int], dict[RequestChunkKey, float]] = {}
        self._expiry_heap: list[tuple[float, int, int, int, tuple[RequestChunkKey, ...]]] = []
        self._num_expiry_batches = 0
        # Per (slot, slice), the runs added with a TTL, stamped with their oldest deadline: see
        # `_not_written_lately`.
        self._runs: RecentRuns[tuple[int, int]] = RecentRuns()
        # Each distinct bitset as one object, so that a lookup finds runs of keys with the same
        # holders by identity (one pointer compare a key). Forgotten when it grows past
        # _MAX_INTERNED (equal bitsets are then two objects: slower lookups, same answers).
        self._interned: dict[int, int] = {}
        self._places: dict[tuple[EngineId, str], tuple[int, int, int, int]] = {}  # see `_place`
        # A GPU-only match of each length, shared by every lookup that returns one (matches are
        # read only): a fleet's engines end their prefixes at few lengths, and a PrefixMatch
        # built per engine per lookup was most of a 256-engine lookup's cost.
        self._gpu_matches: dict[int, PrefixMatch] = {}

    # -- layout ---------------------------------------------------------------------------

    def _slot(self, engine: EngineId) -> int:
        slot = self._slots.get(engine)
        if slot is None:
            slot = self._slots[engine] = len(self._engines)
            self._engines.append(engine)
            if slot >= self._width:
                self._relayout(self._width * 2)
            else:
                self._gpu_only[self._gpu_only_bits(slot)] = engine
        return slot

    def _slice(self, tier: str) -> int:
        index = self._slices.get(tier)
        if index is None:  # a medium a future engine invents: give it its own slice
            index = self._slices[tier] = len(self._tier_names)
            self._tier_names.append(tier)
        return index

    def _relayout(self, width: int) -> None:
        """More engines than slots: widen every slice (rare; O(keys))."""
        old, num_slices = self._width, len(self._tier_names)
        slot_mask = (1 << old) - 1

        def widen(mask: int) -> int:
            return sum(((mask >> (i * old)) & slot_mask) << (i * width) for i in range(num_slices))

        self._interned.clear()
        self._places.clear()
        for table in self._entries.tables():
            for key, mask in table.items():
                table[key] = self._intern(widen(mask))
        self._width = width
        self._gpu_only = {self._gpu_only_bits(slot): engine for slot, engine in enumerate(self._engines)}

    def _intern(self, mask: int) -> int:
        interned = self._interned
        found = interned.get(mask)
        if found is not None:
            return found
        if len(interned) >= _MAX_INTERNED:
            interned.clear()
        interned[mask] = mask
        return mask

    def _place(self, engine: EngineId, tier: str) -> tuple[int, int, int, int]:
        """(slot, slice, the entry bits an add sets, the tier's own bit), kept for the next add."""
        slot, index = self._slot(engine), self._slice(tier)  # may widen the layout: first
        tier_bit = self._bit(slot, index)
        place = self._places[(engine, tier)] = (slot, index, self._intern(tier_bit | self._bit(slot, _ANY)), tier_bit)
        return place

    def _gpu_only_bits(self, slot: int) -> int:
        return (1 << (_ANY * self._width + slot)) | (1 << (self._slices[TIER_GPU] * self._width + slot))

    def _bit(self, slot: int, index: int) -> int:
        return self._intern(1 << (index * self._width + slot))

    def _engine_mask(self, slot: int) -> int:
        """Every bit of one engine, all slices."""
        return sum(1 << (i * self._width + slot) for i in range(len(self._tier_names)))

    # -- queries --------------------------------------------------------------------------

    def lookup(
        self, keys: Sequence[RequestChunkKey], engines: Iterable[EngineId] | None = None
    ) -> dict[EngineId, PrefixMatch]:
        self._expire()
        entries = self._entries
        # 0 for a key `young` lacks (never a bitset): an int is compared with an int faster
        # than with None.
        found = list(map(entries.young.get, keys, itertools.repeat(0)))
        try:
            num_held = found.index(0)  # nobody holds this key: no prefix goes past it
        except ValueError:
            num_held = len(found)
        in_young = num_held  # the keys after these, if held, are in closed generations
        if num_held < len(found) and entries.closed:
            num_held = entries.find_closed(keys, found, num_held)
        if num_held == 0:
            return {}
        del found[num_held:]
        held = found
        if engines is not None:
            wanted = 0
            for engine in engines:
                slot = self._slots.get(engine)
                if slot is not None:
                    wanted |= self._engine_mask(slot)
            held[0] &= wanted
        starts = _run_starts(held)
        runs = list(itertools.accumulate(map(held.__getitem__, starts), operator.and_))
        try:
            ended = runs.index(0)  # the union slice is empty: every run has ended
        except ValueError:
            depth = num_held
        else:
            depth = starts[ended]
            del runs[ended:]
        if depth == 0:
            return {}
        if depth > in_young:  # matched: in use again (young keys need nothing)
            dropped = entries.used(keys[in_young:depth])
            if dropped:
                self._uncount(dropped)
        # Where a run shrinks, the bits it lost ended there (each run holds the next: XOR is
        # the difference); what is left at the end ran through.
        ends = [*map(operator.xor, runs, itertools.islice(runs, 1, None)), runs[-1]]
        lengths = list(itertools.compress([*itertools.islice(starts, 1, len(runs)), depth], ends))
        ends = list(filter(None, ends))
        return self._decode_gpu_runs(ends, lengths) or self._decode(ends, lengths)

    def _decode_gpu_runs(self, ends: list[int], lengths: list[int]) -> dict[EngineId, PrefixMatch]:
        """The usual case, in C loops but for one step an engine: each end is one engine's, in
        the GPU tier only (a fleet of engines that hold prefixes of different lengths in their
        own memory). Empty when it is not that case."""
        try:
            engines = list(map(self._gpu_only.__getitem__, ends))
        except KeyError:
            return {}  # several engines at an end, or an end in another tier
        shared = self._gpu_matches
        try:
            matches = list(map(shared.__getitem__, lengths))
        except KeyError:  # a length no lookup has returned yet
            if len(shared) >= _MAX_SHARED_MATCHES:
                shared.clear()
            for length in lengths:
                if length not in shared:
                    shared[length] = PrefixMatch(length, {TIER_GPU: length})
            matches = list(map(shared.__getitem__, lengths))
        return dict(zip(engines, matches))

    def _decode(self, ends: list[int], lengths: list[int]) -> dict[EngineId, PrefixMatch]:
        num_chunks: dict[EngineId, int] = {}
        by_tier: dict[EngineId, dict[str, int]] = {}
        width = self._width
        for bits, length in zip(ends, lengths):
            while bits:
                low = bits & -bits
                index, slot = divmod(low.bit_length() - 1, width)
                bits ^= low
                engine = self._engines[slot]
                if index == _ANY:
                    num_chunks[engine] = length
                else:
                    by_tier.setdefault(engine, {})[self._tier_names[index]] = length
        return {engine: PrefixMatch(length, by_tier.get(engine, {})) for engine, length in num_chunks.items()}

    def num_chunks(self, engine: EngineId, tier: str = TIER_GPU) -> int:
        self._expire()
        slot = self._slots.get(engine)
        return 0 if slot is None else self._counts.get((slot, self._slice(tier)), 0)

    def __len__(self) -> int:
        return len(self._entries)

    # -- updates --------------------------------------------------------------------------

    def add(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str, ttl_s: float | None = None) -> None:
        place = self._places.get((engine, tier)) or self._place(engine, tier)
        slot, index, bit, tier_bit = place
        if ttl_s is None:
            deadline = None
            expiring = self._deadlines.get((slot, index), _NONE_EXPIRING)
            self._runs.forget((slot, index))  # confirmed keys: no run of this tier stands
        else:
            deadline = self._clock() + ttl_s
            expiring = self._deadlines.setdefault((slot, index), {})
            keys = self._not_written_lately(slot, index, keys, deadline, ttl_s)
        entries = self._entries
        entries.promote(keys)  # every key held is in `young` now
        young = entries.young
        if young.keys().isdisjoint(keys):  # all new (an engine's fresh blocks): C loops only
            fresh = dict.fromkeys(keys, bit)
            young.update(fresh)
            added = len(fresh)
        else:  # some held already (a conversation's next turn): a step a run of one bitset
            added = 0
            held = list(map(young.get, keys, itertools.repeat(0)))
            starts = _run_starts(held)
            for start, end in zip(starts, [*starts[1:], len(keys)]):
                mask = held[start]
                if mask and mask & tier_bit:
                    continue  # held in this tier: nothing to write
                young.update(dict.fromkeys(keys[start:end], self._intern(mask | bit) if mask else bit))
                added += end - start  # (a prompt's keys are distinct: chained)
        if deadline is not None:
            expiring.update(dict.fromkeys(keys, deadline))
        elif expiring:
            for key in keys:
                expiring.pop(key, None)  # confirmed: no longer expires
        if deadline is not None and keys:
            self._num_expiry_batches += 1
            heapq.heappush(self._expiry_heap, (deadline, self._num_expiry_batches, slot, index, tuple(keys)))
        if added:
            self._counts[(slot, index)] = self._counts.get((slot, index), 0) + added
        dropped = entries.shrink()
        if dropped:
            self._uncount(dropped)

    def _not_written_lately(
        self, slot: int, index: int, keys: Sequence[RequestChunkKey], deadline: float, ttl_s: float
    ) -> Sequence[RequestChunkKey]:
        """The keys of an add with a TTL that need writing. A conversation's next turn writes
        its whole prompt again (an engine without events: approximate entries), every key a
        dictionary step or two (~0.3 ms at 16k tokens here). When the last add of this
        (engine, tier) that began with the same key is a prefix of this one, and the oldest
        deadline of that run still has 7/8 of the TTL to go, only the keys past it are
        written: every key of the run then expires no earlier than 7/8 of the TTL from now.
        (A key of the run dropped since for capacity comes back at its next whole write.)"""
        if not keys:
            return keys
        num_written, oldest_deadline = self._runs.covered((slot, index), keys)
        if num_written and oldest_deadline - deadline >= -ttl_s / _REWRITE_EVERY:
            self._runs.note((slot, index), keys, oldest_deadline)
            return keys[num_written:]
        self._runs.note((slot, index), keys, deadline)
        return keys

    def evict(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str) -> None:
        slot = self._slots.get(engine)
        if slot is None:
            return
        index = self._slice(tier)
        self._runs.forget((slot, index))
        self._remove_held(self._entries.held(keys), slot, index)

    def evict_all_tiers(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        """One pass over the generations for every tier (an `evict` a tier took six: an engine's
        reset stalled the event loop ~20-30 ms per 2,048 keys on this machine)."""
        losing = self._losing_all_tiers(engine)
        if losing is None:
            return
        _, mine = losing
        keep = ~mine
        lost: list[int] = []  # the engine's bits each key loses, for the counts
        before = after = lost_bits = -1  # the last change: keys in a row mostly share their bitset
        for table, key in self._entries.held(keys):
            mask = table.get(key)  # read here: a key named twice is gone the second time
            if mask is None or not mask & mine:
                continue
            if mask is not before:
                before, lost_bits, rest = mask, mask & mine, mask & keep
                after = self._intern(rest) if rest else 0
            lost.append(lost_bits)
            if after:
                table[key] = after
            else:
                del table[key]
        if lost:
            self._uncount(lost)

    def clear_engine(self, engine: EngineId) -> None:
        losing = self._losing_all_tiers(engine)
        if losing is None:
            return
        slot, mine = losing
        keep = ~mine
        for table in self._entries.tables():
            for key in [k for k, mask in table.items() if mask & mine]:
                rest = table[key] & keep
                if rest:
                    table[key] = self._intern(rest)
                else:
                    del table[key]
        for count_key in [c for c in self._counts if c[0] == slot]:
            del self._counts[count_key]
        for expiring_key in [e for e in self._deadlines if e[0] == slot]:
            del self._deadlines[expiring_key]

    def _losing_all_tiers(self, engine: EngineId) -> tuple[int, int] | None:
        """The slot and every bit of an engine about to lose entries in every tier, its TTL
        runs forgotten; None for an engine never seen."""
        slot = self._slots.get(engine)
        if slot is None:
            return None
        self._runs.forget_where(lambda owner: owner[0] == slot)
        return slot, self._engine_mask(slot)

    def _remove(self, key: RequestChunkKey, slot: int, index: int) -> None:
        table = self._entries.holder(key)
        if table is not None:
            self._remove_held(((table, key),), slot, index)

    def _remove_held(
        self, held: Iterable[tuple[dict[RequestChunkKey, int], RequestChunkKey]], slot: int, index: int
    ) -> None:
        """(slot, tier) no longer holds these keys, each in the generation given (no move)."""
        tier_bit = self._bit(slot, index)
        any_bit = self._bit(slot, _ANY)
        tiers_of_engine = self._engine_mask(slot) & ~any_bit
        removed = 0
        before = after = 0  # the last change: keys in a row mostly share their bitset object
        for table, key in held:
            mask = table.get(key)  # read here: a key named twice is gone the second time
            if mask is None or not mask & tier_bit:
                continue
            removed += 1
            if mask is not before:
                before = mask
                mask &= ~tier_bit
                if not mask & tiers_of_engine:
                    mask &= ~any_bit  # no tier left for this engine
                after = self._intern(mask) if mask else 0
            if after:
                table[key] = after
            else:
                del table[key]
        if removed:
            self._counts[(slot, index)] -= removed

    def _uncount(self, masks: list[int]) -> None:
        """Whole keys dropped: every (engine, tier) each had loses one chunk. Keys dropped
        together mostly came in together, with one bitset: each distinct one is decoded once."""
        width = self._width
        for mask, times in Counter(masks).items():
            mask >>= width  # not the union slice
            while mask:
                low = mask & -mask
                index, slot = divmod(low.bit_length() - 1 + width, width)
                mask ^= low
                self._counts[(slot, index)] -= times

    def _expire(self) -> None:
        now = self._clock()
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            deadline, _, slot, index, keys = heapq.heappop(heap)
            expiring = self._deadlines.get((slot, index))
            if not expiring:
                continue
            for key in keys:
                # Refreshed since (a later deadline) or confirmed (gone from `expiring`): kept.
                if expiring.get(key) == deadline:
                    del expiring[key]
                    self._remove(key, slot, index)


def _run_starts(masks: list[int]) -> list[int]:
    """Where each run of one bitset begins in `masks` (not empty), in C loops. Runs can only
    change where the bitset object does: equal ones are mostly one object (`_intern`). The
    first run is mostly the longest (a prefix everyone holds, then the tails), often all of
    it: found by two scans (`count`), and only the values after it compared one by one. A
    start may begin a run equal to the one before (two objects): that costs a step, never an
    answer."""
    first = masks[0]
    num_first = masks.count(first)  # equal, not only identical: one run all the same
    if num_first == len(masks):
        return [0]
    if masks[:num_first].count(first) != num_first:
        num_first = 1  # the first run ends before the last of its equals: compare all
    after_first = itertools.islice(masks, num_first, None)
    changes = map(operator.is_not, itertools.islice(masks, num_first - 1, None), after_first)
    return [0, *itertools.compress(range(num_first, len(masks)), changes)]
