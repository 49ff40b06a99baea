"""`InMemoryIndex` under capacity pressure: the generations (approximate LRU) of
gateway/kvindex/generations.py (what is dropped first, what a use protects, what it costs)."""

from __future__ import annotations

import random

from gateway.kvindex.base import TIER_CPU, TIER_GPU
from gateway.kvindex.generations import CLOSED_MAX, Generations
from gateway.kvindex.memory import InMemoryIndex
from gateway.types import EngineId, PrefixMatch, RequestChunkKey

A, B = EngineId("a"), EngineId("b")


def keys(*values: int) -> list[RequestChunkKey]:
    return [RequestChunkKey(v) for v in values]


def held(index: InMemoryIndex, key: int) -> bool:
    return bool(index.lookup(keys(key)))


def kept(index: InMemoryIndex, key: int) -> bool:
    """Whether the index still has `key`, without the lookup that would count as a use."""
    return index._entries.holder(RequestChunkKey(key)) is not None


def lengths(matches: dict[EngineId, PrefixMatch]) -> dict[str, int]:
    return {engine: m.num_chunks for engine, m in matches.items()}


def test_a_key_used_again_outlives_the_older_unused_ones() -> None:
    index = InMemoryIndex(capacity_chunks=8)  # generations of 8 / 4 = 2 keys
    for pair in ((1, 2), (3, 4), (5, 6)):
        index.add(A, keys(*pair), TIER_GPU)
    assert lengths(index.lookup(keys(1))) == {"a": 1}  # key 1 in use again
    index.add(A, keys(7, 8), TIER_GPU)
    index.add(A, keys(9, 10), TIER_GPU)  # 10 keys: the two least recently used go
    assert len(index) == 8
    assert [k for k in range(1, 11) if not held(index, k)] == [2, 3]  # as an exact LRU
    assert index.num_chunks(A) == 8


def test_using_a_young_key_again_does_not_move_it() -> None:
    # The documented difference from an exact LRU, which would drop key 2 here.
    index = InMemoryIndex(capacity_chunks=16)  # generations of 4 keys
    index.add(A, keys(1, 2, 3), TIER_GPU)
    assert lengths(index.lookup(keys(1))) == {"a": 1}  # young already: stays first
    for start in (4, 8, 12):
        index.add(A, keys(*range(start, start + 4)), TIER_GPU)
    index.add(A, keys(16, 17), TIER_GPU)  # 17 keys: one goes
    assert not held(index, 1)
    assert held(index, 2)


def test_generations_whose_keys_were_used_again_are_dropped_past_the_fourth() -> None:
    # Each closed generation keeps its whole table until empty: past four, the oldest goes
    # whole even below capacity (its keys went unused while `capacity` keys came in).
    index = InMemoryIndex(capacity_chunks=16)  # generations of 4 keys
    for start in (1, 5, 9, 13):
        index.add(A, keys(*range(start, start + 4)), TIER_GPU)
    assert lengths(index.lookup(keys(2, 3, 4, 6))) == {"a": 4}  # young is full: it closes
    index.evict(A, keys(13, 14), TIER_GPU)
    index.add(A, keys(17), TIER_GPU)  # five closed generations
    assert len(index) == 14  # 16 - 2 evicted + 1 added - key 1: below the capacity
    assert not held(index, 1)
    assert held(index, 5)
    assert index.num_chunks(A) == 14


def test_a_prompt_spanning_generations_matches_whole() -> None:
    index = InMemoryIndex(capacity_chunks=8)  # generations of 2 keys
    index.add(A, keys(1, 2), TIER_GPU)
    index.add(A, keys(3, 4), TIER_GPU)
    index.add(A, keys(5), TIER_GPU)  # young
    matches = index.lookup(keys(1, 5, 3, 99, 2))  # oldest, young, newer, nobody's
    assert lengths(matches) == {"a": 3}
    assert matches[A].by_tier == {TIER_GPU: 3}


def test_only_the_matched_part_of_a_lookup_counts_as_use() -> None:
    index = InMemoryIndex(capacity_chunks=8)  # generations of 2 keys
    index.add(A, keys(1, 2), TIER_GPU)
    index.add(B, keys(3), TIER_GPU)
    index.add(A, keys(4), TIER_GPU)
    index.add(A, keys(5, 6), TIER_GPU)
    assert index.lookup(keys(1, 2, 3), engines=[B]) == {}  # B lacks key 1: nothing matched
    # Key 3 is held (by B), but no engine holds 1, 2, 3: only 1 and 2 are in use again.
    assert lengths(index.lookup(keys(1, 2, 3))) == {"a": 2}
    index.add(A, keys(7, 8), TIER_GPU)
    index.add(A, keys(9, 10), TIER_GPU)  # 10 keys: the two least recently used go
    assert [k for k in range(1, 7) if not held(index, k)] == [3, 4]
    assert index.num_chunks(B) == 0
    assert index.num_chunks(A) == 8


def test_engine_evictions_and_drops_agree_with_a_reference_under_pressure() -> None:
    """Random adds, engine evictions and lookups at a capacity far below the keys in play:
    the index holds at most `capacity` keys, drops a key for every engine and tier at once
    (what it keeps is exactly what was added and not evicted), keeps the span just added,
    and its counts follow."""
    rng = random.Random(11)
    capacity = 40
    index = InMemoryIndex(capacity_chunks=capacity)
    engines, tiers = [EngineId(f"e{i}") for i in range(5)], [TIER_GPU, TIER_CPU]
    reference: dict[int, set[tuple[str, str]]] = {}  # key -> (engine, tier) holding it
    drops = 0

    def forget_dropped() -> int:
        gone = [k for k in reference if not kept(index, k)]
        for key in gone:
            del reference[key]  # dropped by capacity, for every engine and tier
        return len(gone)

    for step in range(3000):
        engine, tier = rng.choice(engines), rng.choice(tiers)
        start = rng.randrange(150)
        span = keys(*range(start, start + rng.randrange(1, 20)))
        action = rng.random()
        if action < 0.6:
            index.add(engine, span, tier)
            for key in span:
                reference.setdefault(key, set()).add((engine, tier))
            assert index.lookup(span, engines=[engine])[engine].by_tier[tier] == len(span)
        elif action < 0.8:
            index.evict(engine, span, tier)
            for key in span:
                reference.get(key, set()).discard((engine, tier))
                if not reference.get(key, True):
                    del reference[key]
        else:
            index.lookup(span)
        assert len(index) <= capacity
        drops += forget_dropped()
        assert len(index) == len(reference)
        if step % 25 == 0:
            for key in sorted(reference):
                if key not in reference:
                    continue  # dropped meanwhile: lookups alone drop past CLOSED_MAX generations
                matches = index.lookup(keys(key))
                assert {(e, t) for e, m in matches.items() for t in m.by_tier} == reference[key]
                drops += forget_dropped()
            assert len(index) == len(reference)
            for engine in engines:
                for tier in tiers:
                    expected = sum(1 for holders in reference.values() if (engine, tier) in holders)
                    assert index.num_chunks(engine, tier) == expected
    assert drops > 100  # the pressure was real


def test_generations_promote_from_the_closed_ones_and_drop_in_entry_order() -> None:
    generations: Generations[int] = Generations(capacity=8)  # generations of 2 keys
    generations.young.update({1: 10, 2: 20})
    assert generations.shrink() == []
    generations.young.update({3: 30, 4: 40})
    assert generations.shrink() == []
    assert (generations.young, list(generations.closed)) == ({}, [{1: 10, 2: 20}, {3: 30, 4: 40}])
    generations.promote([4, 9, 3])  # 9: held by none
    assert generations.young == {4: 40, 3: 30}
    assert list(generations.young) == [4, 3]  # in the order used
    assert generations.holder(3) is generations.young and generations.holder(2) is generations.closed[0]
    assert generations.holder(9) is None
    generations.young.update({5: 50, 6: 60, 7: 70, 8: 80, 9: 90})  # 9 keys: one goes
    assert generations.shrink() == [10]  # and the closed {3, 4}, emptied by use, is gone
    assert list(generations.closed) == [{2: 20}, {4: 40, 3: 30, 5: 50, 6: 60, 7: 70, 8: 80, 9: 90}]
    generations.promote([2])  # empties the oldest
    generations.young.update({10: 100, 11: 110})
    assert generations.shrink() == [40, 30]  # from the next oldest, in entry order; 2 stays
    assert generations._drop_order is not None  # a name per key of the generation now oldest
    assert len(generations) == 8


def test_keys_a_lookup_used_move_before_the_next_drop() -> None:
    generations: Generations[int] = Generations(capacity=8)  # generations of 2 keys
    for pair in ((1, 2), (3, 4)):
        generations.young.update({key: 10 * key for key in pair})
        assert generations.shrink() == []
    generations.used([1])  # fewer than a generation's worth: only noted, the tables untouched
    assert generations.holder(1) is generations.closed[0]
    generations.young.update({5: 50, 6: 60, 7: 70, 8: 80, 9: 90})  # 9 keys: one goes
    assert generations.shrink() == [20]  # key 1's use counted first: key 2 goes
    assert generations.holder(1) is generations.closed[-1]


def test_lookups_without_adds_do_not_pile_up_tables() -> None:
    # Requests refused after their lookup (limits, no healthy engine) add nothing: the keys
    # they use move into `young` without closing one table after another, and the closed
    # tables they empty go.
    index = InMemoryIndex(capacity_chunks=1000)  # generations of 250 keys
    all_keys = keys(*range(1000))
    for start in range(0, 1000, 16):
        index.add(A, all_keys[start : start + 16], TIER_GPU)
    for _ in range(50):
        for start in range(0, 1000, 50):
            assert lengths(index.lookup(all_keys[start : start + 50])) == {"a": 50}
    assert len(index._entries.tables()) <= 1 + CLOSED_MAX
    assert all(index._entries.closed)  # no emptied table kept
    assert len(index) == 1000 and index.num_chunks(A) == 1000
    index.add(A, keys(5000), TIER_GPU)  # the next add closes the grown `young` and drops a key
    assert len(index) == 1000 and index.num_chunks(A) == 1000


def test_evicting_keys_across_generations_counts_each_once() -> None:
    index = InMemoryIndex(capacity_chunks=8)  # generations of 2 keys
    index.add(A, keys(1, 2), TIER_GPU)
    index.add(A, keys(3, 4), TIER_GPU)
    index.add(A, keys(5), TIER_GPU)
    index.add(A, keys(1, 5), TIER_CPU)  # key 1 moves to the young generation
    index.evict(A, keys(1, 1, 3, 5, 3, 99), TIER_GPU)  # young, closed, named twice, nobody's
    assert index.num_chunks(A) == 2 and index.num_chunks(A, TIER_CPU) == 2
    assert [k for k in range(1, 6) if held(index, k)] == [1, 2, 4, 5]
    assert index.lookup(keys(1))[A].by_tier == {TIER_CPU: 1}
    index.evict(A, keys(1, 5), TIER_CPU)  # no tier left: the keys go
    assert [k for k in range(1, 6) if kept(index, k)] == [2, 4] and len(index) == 2
