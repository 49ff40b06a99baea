"""WorkingSetTracker (gateway/kvindex/working_set.py): keys used within the window, kept as a
few sets rather than a time per key."""

from __future__ import annotations

import random

from gateway.kvindex.working_set import WorkingSetTracker
from gateway.types import EngineId, RequestChunkKey

A, B = EngineId("a"), EngineId("b")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys(start: int, count: int) -> list[RequestChunkKey]:
    return [RequestChunkKey(k) for k in range(start, start + count)]


def test_a_key_stays_for_the_window_and_at_most_a_quarter_more() -> None:
    clock = FakeClock()
    ws = WorkingSetTracker(window_s=100, clock=clock)
    ws.touch(A, keys(0, 10))
    clock.now += 100
    assert ws.size(A) == 10 and ws.num_missing(A, keys(0, 10)) == 0
    clock.now += 25
    assert ws.size(A) == 0 and ws.num_missing(A, keys(0, 10)) == 10
    assert ws.size(B) == 0 and ws.num_missing(B, keys(0, 3)) == 3  # engines apart


def test_touching_a_key_again_keeps_it_and_counts_it_once() -> None:
    clock = FakeClock()
    ws = WorkingSetTracker(window_s=100, clock=clock)
    ws.touch(A, keys(0, 10))
    clock.now += 60
    ws.touch(A, keys(5, 10))  # 5..14: half of them again
    assert ws.size(A) == 15
    assert ws.num_missing(A, keys(0, 20)) == 5
    clock.now += 70  # 130 s after the first touch, 70 after the second
    assert ws.size(A) == 10 and ws.num_missing(A, keys(0, 20)) == 10  # 0..4 went


def test_the_bound_drops_the_oldest_keys_first() -> None:
    clock = FakeClock()
    ws = WorkingSetTracker(window_s=100, max_tracked=25, clock=clock)
    for start in (0, 10, 20):
        ws.touch_prompt(A, keys(start, 10))
        clock.now += 30  # a set each
    assert ws.size(A) == 20 and ws.num_missing(A, keys(0, 30)) == 10
    assert sorted(ws.forget(A)) == keys(10, 20)
    assert ws.size(A) == 0 and ws.forget(A) == []
    ws.touch_prompt(A, keys(40, 10))
    assert sorted(ws.forget(A)) == keys(40, 10)
    ws.touch(A, keys(50, 5))
    assert ws.num_missing(A, keys(40, 10)) == 10  # forgotten, however it was touched before


def test_matches_a_time_per_key_within_a_quarter_of_the_window() -> None:
    """Against a plain model (key -> time of last use): a key used within the window is always
    counted, one unused for more than 1.25 windows never is."""
    rng = random.Random(7)
    clock = FakeClock()
    window_s = 40.0
    ws = WorkingSetTracker(window_s=window_s, clock=clock)
    last_used: dict[EngineId, dict[RequestChunkKey, float]] = {A: {}, B: {}}
    for _ in range(3000):
        clock.now += rng.expovariate(1.0)
        engine = rng.choice((A, B))
        batch = keys(rng.randrange(200), rng.randrange(1, 30))
        if rng.random() < 0.6:
            # Routed prompts (their runs remembered) and stored blocks (not).
            (ws.touch_prompt if rng.random() < 0.7 else ws.touch)(engine, batch)
            last_used[engine].update(dict.fromkeys(batch, clock.now))
            continue
        used = last_used[engine]
        surely_in = [k for k in batch if clock.now - used.get(k, -1e9) <= window_s]
        maybe_in = [k for k in batch if clock.now - used.get(k, -1e9) <= 1.25 * window_s]
        missing = ws.num_missing(engine, batch)
        assert len(batch) - len(maybe_in) <= missing <= len(batch) - len(surely_in)
        within = sum(clock.now - t <= window_s for t in used.values())
        assert within <= ws.size(engine) <= sum(clock.now - t <= 1.25 * window_s for t in used.values())
