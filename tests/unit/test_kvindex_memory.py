"""Contract tests for `ChunkIndex` (gateway/kvindex/base.py), run against `InMemoryIndex`.

Another implementation can be added to `INDEXES`; the tests use only the protocol plus an
injected clock.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.kvindex.base import TIER_APPROXIMATE, TIER_CPU, TIER_GPU, TIER_SPECULATIVE, ChunkIndex, PrefixMatch
from gateway.kvindex.memory import InMemoryIndex
from gateway.types import EngineId, RequestChunkKey

A, B, C = EngineId("a"), EngineId("b"), EngineId("c")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


IndexFactory = Callable[[FakeClock, int], ChunkIndex]
INDEXES: dict[str, IndexFactory] = {
    "memory": lambda clock, capacity: InMemoryIndex(capacity_chunks=capacity, clock=clock),
}


@pytest.fixture(params=sorted(INDEXES))
def make(request: pytest.FixtureRequest) -> Callable[..., tuple[ChunkIndex, FakeClock]]:
    factory = INDEXES[request.param]

    def build(capacity: int = 1_000_000) -> tuple[ChunkIndex, FakeClock]:
        clock = FakeClock()
        return factory(clock, capacity), clock

    return build


def keys(*values: int) -> list[RequestChunkKey]:
    return [RequestChunkKey(v) for v in values]


K = keys(*range(1, 11))  # a request's chunk keys, in order


def lengths(matches: dict[EngineId, PrefixMatch]) -> dict[str, int]:
    return {engine: m.num_chunks for engine, m in matches.items()}


def test_empty_index_matches_nothing(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    assert index.lookup(K) == {}
    assert index.lookup([]) == {}
    assert index.num_chunks(A) == 0


def test_longest_consecutive_prefix_per_engine(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:6], TIER_GPU)
    index.add(B, K[:3], TIER_GPU)
    index.add(B, K[4:8], TIER_GPU)  # a hole at K[3]: only the first 3 count
    index.add(C, K[1:5], TIER_GPU)  # does not hold the first chunk: no match at all
    matches = index.lookup(K)
    assert lengths(matches) == {"a": 6, "b": 3}
    assert matches[A].by_tier == {TIER_GPU: 6}
    assert matches[B].by_tier == {TIER_GPU: 3}


def test_a_holder_set_that_comes_back_after_a_change_is_not_one_run(
    make: Callable[..., tuple[ChunkIndex, FakeClock]],
) -> None:
    index, _ = make()
    index.add(A, K[:3], TIER_GPU)
    index.add(B, K[:1], TIER_GPU)
    index.add(B, K[2:3], TIER_GPU)  # keys 0 and 2 have the same holders, key 1 fewer
    assert lengths(index.lookup(K)) == {"a": 3, "b": 1}


def test_lookup_stops_at_the_end_of_the_request(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K, TIER_GPU)
    assert lengths(index.lookup(K[:4])) == {"a": 4}


def test_lookup_restricted_to_engines(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:5], TIER_GPU)
    index.add(B, K[:2], TIER_GPU)
    assert lengths(index.lookup(K, engines=[B])) == {"b": 2}
    assert lengths(index.lookup(K, engines=[B, C])) == {"b": 2}
    assert index.lookup(K, engines=[]) == {}


def test_per_tier_prefixes(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:6], TIER_CPU)
    index.add(A, K[:3], TIER_GPU)
    match = index.lookup(K)[A]
    assert match.num_chunks == 6
    assert match.by_tier == {TIER_GPU: 3, TIER_CPU: 6}
    assert index.num_chunks(A, TIER_GPU) == 3
    assert index.num_chunks(A, TIER_CPU) == 6
    assert index.num_chunks(A) == 3  # default tier is GPU


def test_tier_present_from_the_start_counts_only_its_own_run(
    make: Callable[..., tuple[ChunkIndex, FakeClock]],
) -> None:
    index, _ = make()
    index.add(A, K[:2], TIER_GPU)
    index.add(A, K[1:4], TIER_CPU)  # CPU holds chunks 1..3 but not chunk 0
    index.add(A, K[3:5], TIER_GPU)  # GPU again later, after a GPU hole at chunk 2
    match = index.lookup(K)[A]
    assert match.num_chunks == 5  # any tier, consecutively: 0,1 GPU; 2 CPU; 3,4 both
    assert match.by_tier[TIER_GPU] == 2  # GPU's run from the start ends at its hole


def test_tier_absent_from_the_first_chunk_has_no_prefix(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    # PrefixMatch: "longest consecutive run of a request's chunks, from its first". The engine
    # holds chunk 0 only on GPU and chunks 1..2 only on CPU: the CPU tier holds no prefix, and
    # a longer request must not report a longer per-tier prefix than its own prefix implies.
    index, _ = make()
    index.add(A, K[:1], TIER_GPU)
    index.add(A, K[1:3], TIER_CPU)
    short, full = index.lookup(K[:2])[A], index.lookup(K[:3])[A]
    assert (short.num_chunks, full.num_chunks) == (2, 3)
    assert short.by_tier == {TIER_GPU: 1}
    assert full.by_tier == {TIER_GPU: 1}


def test_evict_per_tier(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:5], TIER_GPU)
    index.add(A, K[:5], TIER_CPU)
    index.add(B, K[:5], TIER_GPU)
    index.evict(A, K[2:3], TIER_GPU)
    match = index.lookup(K)[A]
    assert match.num_chunks == 5  # still on CPU
    assert match.by_tier == {TIER_GPU: 2, TIER_CPU: 5}
    assert index.num_chunks(A, TIER_GPU) == 4
    assert lengths(index.lookup(K, engines=[B])) == {"b": 5}  # other engines untouched
    index.evict(A, K[2:3], TIER_CPU)
    assert index.lookup(K)[A].num_chunks == 2
    index.evict(A, keys(999), TIER_GPU)  # unknown keys are ignored
    index.evict(C, K, TIER_GPU)  # unknown engine too
    index.evict(A, K[2:3], TIER_GPU)  # evicting twice does not count twice
    assert index.num_chunks(A, TIER_GPU) == 4


def test_clear_engine(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:5], TIER_GPU)
    index.add(A, K[:5], TIER_CPU)
    index.add(B, K[:5], TIER_GPU)
    index.clear_engine(A)
    assert lengths(index.lookup(K)) == {"b": 5}
    assert index.num_chunks(A, TIER_GPU) == 0 and index.num_chunks(A, TIER_CPU) == 0
    assert index.num_chunks(B) == 5
    index.clear_engine(C)  # unknown: no-op
    index.add(A, K[:2], TIER_GPU)  # usable again afterwards
    assert lengths(index.lookup(K)) == {"a": 2, "b": 5}


def test_num_chunks_counts_distinct_entries(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:4], TIER_GPU)
    index.add(A, K[:6], TIER_GPU)  # re-adding does not double count
    index.add(B, K[:2], TIER_GPU)
    assert index.num_chunks(A) == 6
    assert index.num_chunks(B) == 2
    assert index.num_chunks(A, TIER_SPECULATIVE) == 0


def test_unknown_tier_is_kept_apart(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make()
    index.add(A, K[:3], "NVME")
    assert index.lookup(K)[A].by_tier == {"NVME": 3}
    assert index.num_chunks(A, "NVME") == 3
    assert index.num_chunks(A, TIER_GPU) == 0


# --- TTL --------------------------------------------------------------------------------------


def test_ttl_entries_expire(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make()
    index.add(A, K[:4], TIER_SPECULATIVE, ttl_s=10)
    index.add(A, K[:2], TIER_GPU)
    clock.now += 9.9
    assert index.lookup(K)[A].by_tier == {TIER_GPU: 2, TIER_SPECULATIVE: 4}
    assert index.num_chunks(A, TIER_SPECULATIVE) == 4
    clock.now += 0.2
    assert index.lookup(K)[A].by_tier == {TIER_GPU: 2}
    assert index.num_chunks(A, TIER_SPECULATIVE) == 0
    assert index.num_chunks(A, TIER_GPU) == 2


def test_rewrite_with_ttl_extends_deadline(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make()
    index.add(A, K[:3], TIER_APPROXIMATE, ttl_s=10)
    clock.now += 5
    index.add(A, K[:2], TIER_APPROXIMATE, ttl_s=10)  # first two chunks renewed until +15
    clock.now += 6  # +11: the third chunk's first deadline passed
    assert lengths(index.lookup(K)) == {"a": 2}
    assert index.num_chunks(A, TIER_APPROXIMATE) == 2
    clock.now += 5  # +16
    assert index.lookup(K) == {}
    assert index.num_chunks(A, TIER_APPROXIMATE) == 0


def test_a_longer_run_written_again_soon_writes_only_its_new_keys(
    make: Callable[..., tuple[ChunkIndex, FakeClock]],
) -> None:
    """A conversation's next turn within an eighth of the TTL: the keys it shares with the run
    written before keep that run's deadline (still 7/8 of the TTL away at least)."""
    index, clock = make()
    index.add(A, K[:3], TIER_APPROXIMATE, ttl_s=80)  # until +80
    clock.now += 5
    index.add(A, K[:5], TIER_APPROXIMATE, ttl_s=80)  # K[3:5] until +85, K[:3] still +80
    clock.now += 76  # +81
    assert index.lookup(K) == {} and index.num_chunks(A, TIER_APPROXIMATE) == 2
    index.add(B, K[:3], TIER_APPROXIMATE, ttl_s=80)  # until +161
    clock.now += 11  # past an eighth
    index.add(B, K[:5], TIER_APPROXIMATE, ttl_s=80)  # all written again: until +172
    clock.now += 75  # +167
    assert lengths(index.lookup(K)) == {"b": 5}


def test_a_run_written_again_after_an_eviction_or_a_confirmation_is_written_whole(
    make: Callable[..., tuple[ChunkIndex, FakeClock]],
) -> None:
    index, clock = make()
    index.add(A, K[:4], TIER_APPROXIMATE, ttl_s=80)
    index.evict(A, K[2:4], TIER_APPROXIMATE)
    clock.now += 1
    index.add(A, K[:6], TIER_APPROXIMATE, ttl_s=80)
    assert lengths(index.lookup(K)) == {"a": 6}
    index.add(B, K[:4], TIER_SPECULATIVE, ttl_s=80)
    index.add(B, K[:4], TIER_SPECULATIVE)  # confirmed: no longer expire
    index.add(B, K[:6], TIER_SPECULATIVE, ttl_s=80)  # expire again, all of them
    clock.now += 100
    assert "b" not in lengths(index.lookup(K))


def test_readding_without_ttl_cancels_expiry(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make()
    index.add(A, K[:4], TIER_GPU, ttl_s=5)
    index.add(A, K[:2], TIER_GPU)  # confirmed: these two no longer expire
    clock.now += 100
    assert lengths(index.lookup(K)) == {"a": 2}
    assert index.num_chunks(A) == 2


def test_expiry_after_evict_and_readd_keeps_new_entry(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make()
    index.add(A, K[:2], TIER_SPECULATIVE, ttl_s=5)
    index.evict(A, K[:2], TIER_SPECULATIVE)
    index.add(A, K[:2], TIER_SPECULATIVE)  # no TTL this time
    clock.now += 10
    assert lengths(index.lookup(K)) == {"a": 2}


def test_clear_engine_drops_pending_expiries(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make()
    index.add(A, K[:2], TIER_SPECULATIVE, ttl_s=5)
    index.clear_engine(A)
    index.add(A, K[:2], TIER_SPECULATIVE)  # permanent now
    clock.now += 10
    assert lengths(index.lookup(K)) == {"a": 2}
    assert index.num_chunks(A, TIER_SPECULATIVE) == 2


def test_ttl_is_per_engine(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make()
    index.add(A, K[:3], TIER_SPECULATIVE, ttl_s=5)
    index.add(B, K[:3], TIER_SPECULATIVE)
    clock.now += 10
    assert lengths(index.lookup(K)) == {"b": 3}


# --- capacity (LRU over keys) ------------------------------------------------------------------


def test_capacity_drops_least_recently_used_keys(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make(capacity=4)
    first, second, third = keys(1, 2), keys(3, 4), keys(5, 6)
    index.add(A, first, TIER_GPU)
    index.add(B, second, TIER_GPU)
    assert lengths(index.lookup(first)) == {"a": 2}  # refreshes `first`: `second` is now oldest
    index.add(A, third, TIER_GPU)
    assert index.lookup(second) == {}  # dropped for every engine
    assert lengths(index.lookup(first)) == {"a": 2}
    assert lengths(index.lookup(third)) == {"a": 2}
    assert index.num_chunks(B) == 0  # counts follow the drop
    assert index.num_chunks(A) == 4


def test_capacity_drop_removes_key_for_all_engines_and_tiers(
    make: Callable[..., tuple[ChunkIndex, FakeClock]],
) -> None:
    index, _ = make(capacity=2)
    index.add(A, keys(1), TIER_GPU)
    index.add(A, keys(1), TIER_CPU)
    index.add(B, keys(1), TIER_GPU)
    index.add(C, keys(2, 3), TIER_GPU)  # pushes key 1 out
    assert index.lookup(keys(1)) == {}
    assert (index.num_chunks(A, TIER_GPU), index.num_chunks(A, TIER_CPU), index.num_chunks(B)) == (0, 0, 0)
    assert index.num_chunks(C) == 2


def test_adding_refreshes_recency(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, _ = make(capacity=3)
    index.add(A, keys(1, 2, 3), TIER_GPU)
    index.add(B, keys(1), TIER_GPU)  # key 1 touched again
    index.add(A, keys(4), TIER_GPU)  # drops key 2, the oldest
    assert lengths(index.lookup(keys(1))) == {"a": 1, "b": 1}
    assert index.lookup(keys(2)) == {}
    assert lengths(index.lookup(keys(3, 4))) == {"a": 2}


def test_dropped_ttl_entry_can_be_readded(make: Callable[..., tuple[ChunkIndex, FakeClock]]) -> None:
    index, clock = make(capacity=1)
    index.add(A, keys(1), TIER_SPECULATIVE, ttl_s=5)
    index.add(A, keys(2), TIER_SPECULATIVE)  # drops key 1 by capacity
    index.add(A, keys(1), TIER_SPECULATIVE)  # back, permanent; drops key 2
    clock.now += 10
    assert lengths(index.lookup(keys(1))) == {"a": 1}
    assert index.num_chunks(A, TIER_SPECULATIVE) == 1


@pytest.mark.parametrize("tiers", [["GPU", "CPU", "speculative"], ["GPU"]], ids=["three-tiers", "gpu-only"])
def test_matches_a_plain_reference_on_random_fleets_beyond_one_slice_of_slots(tiers: list[str]) -> None:
    """100 engines (more than the first 64 slots, so the layout widens mid-way), random adds,
    evictions (of one tier or all) and lookups, some restricted to engines: every match and
    count equals the naive per-engine, per-tier walk. (GPU only: the lookup's fast decoding,
    one tier an end.)"""
    import random

    from gateway.kvindex.memory import InMemoryIndex

    rng = random.Random(3)
    index = InMemoryIndex(capacity_chunks=10**6)
    held: dict[tuple[str, int, str], bool] = {}
    keys = [RequestChunkKey(k) for k in range(200)]
    for step in range(3000):
        engine = EngineId(f"e{rng.randrange(100)}")
        tier = rng.choice(tiers)
        start = rng.randrange(150)
        span = keys[start : start + rng.randrange(1, 50)]
        if rng.random() < 0.7:
            index.add(engine, span, tier)
            held.update({(engine, k, tier): True for k in span})
        elif rng.random() < 0.2:
            index.evict_all_tiers(engine, span)
            for k in span:
                for t in tiers:
                    held.pop((engine, k, t), None)
        else:
            index.evict(engine, span, tier)
            for k in span:
                held.pop((engine, k, tier), None)
        if step % 50 == 0:
            query = keys[rng.randrange(20) : rng.randrange(20, 200)]
            expected: dict[str, tuple[int, dict[str, int]]] = {}
            among = {EngineId(f"e{rng.randrange(100)}") for _ in range(30)} if step % 100 else None
            for e in {e for (e, _, _) in held if among is None or e in among}:
                any_run = next((i for i, k in enumerate(query) if not any((e, k, t) in held for t in tiers)), len(query))
                by_tier = {t: next((i for i, k in enumerate(query) if (e, k, t) not in held), len(query)) for t in tiers}
                if any_run:
                    expected[e] = (any_run, {t: n for t, n in by_tier.items() if n})
            got = {e: (m.num_chunks, m.by_tier) for e, m in index.lookup(query, among).items()}
            assert got == expected
    for e in {e for (e, _, _) in held}:
        for t in tiers:
            assert index.num_chunks(EngineId(e), t) == sum(1 for (x, _, u) in held if x == e and u == t)
