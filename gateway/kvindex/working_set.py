"""What each engine has been asked to keep lately: its working set, in chunks.

An engine's KV cache holds `capacity` blocks. The chunks of the requests routed to it within
`window_s` are what it needs resident to keep hitting; when their number exceeds capacity,
the engine's LRU evicts prefixes that are still in use and nothing hits. Routing consults
this to place new prefix groups where they fit.

Recency is kept as which of a few sets holds a key, not as a time per key: each set takes the
keys first touched within a quarter of the window (a key touched again moves to the newest),
and a set is dropped whole once all of it is older than the window. So a key stays in the
working set for the window and at most a quarter more after its last use. Every step is a C
loop over the keys (a conversation's next turn touches all its chunks again, and each of a
routing decision's candidates counts the prompt's missing ones): an ordered dict with a time
per key cost 2-3× as much.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from gateway.types import EngineId, RequestChunkKey

_NUM_SPANS = 4  # sets per window: more, finer expiry but more sets to look through


class WorkingSetTracker:
    def __init__(self, window_s: float = 60.0, max_tracked: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._window_s = window_s
        self._span_s = window_s / _NUM_SPANS
        self._max_tracked = max_tracked
        self._clock = clock
        # Per engine, oldest first: (when the set opened, the keys last touched in its span).
        # A key is in one set at most.
        self._recent: dict[EngineId, deque[tuple[float, set[RequestChunkKey]]]] = {}

    def touch(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        now = self._clock()
        spans = self._recent.setdefault(engine, deque())
        self._trim(spans, now)
        if not spans or now - spans[-1][0] >= self._span_s:
            spans.append((now, set()))
        newest = spans[-1][1]
        moved = list(itertools.filterfalse(newest.__contains__, keys))  # not touched this span
        if not moved:
            return
        newest.update(moved)
        for _, older in itertools.islice(spans, len(spans) - 1):
            older.difference_update(moved)
        while len(spans) > 1 and sum(len(held) for _, held in spans) > self._max_tracked:
            spans.popleft()  # the oldest set, whole: the bound is coarse, the cost per key nil

    def size(self, engine: EngineId) -> int:
        spans = self._recent.get(engine)
        if not spans:
            return 0
        self._trim(spans, self._clock())
        return sum(len(held) for _, held in spans)

    def num_missing(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> int:
        """How many of `keys` are not in the engine's working set (not used within the window).
        A routing decision asks this of every candidate for every chunk of the prompt: one C
        pass over the keys for the newest set (a conversation's earlier turns are mostly
        there), then over the few left for each older one."""
        spans = self._recent.get(engine)
        if not spans:
            return len(keys)
        self._trim(spans, self._clock())
        missing: Sequence[RequestChunkKey] = keys
        for _, held in reversed(spans):
            if not missing:
                break
            missing = list(itertools.filterfalse(held.__contains__, missing))
        return len(missing)

    def _trim(self, spans: deque[tuple[float, set[RequestChunkKey]]], now: float) -> None:
        """Drop the sets whose every key was last used before the window."""
        while spans and spans[0][0] + self._span_s <= now - self._window_s:
            spans.popleft()

    def forget(self, engine: EngineId) -> list[RequestChunkKey]:
        """Drop the engine's working set; returns the keys it had (routed there lately)."""
        return [key for _, held in self._recent.pop(engine, ()) for key in held]
