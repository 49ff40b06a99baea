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
per key cost 2-3× as much. A prompt that extends the last one touched on the engine with the
same first key (a conversation's next turn) needs a step for its new keys only: the earlier
ones are known to be there.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from gateway.types import EngineId, RequestChunkKey

_NUM_SPANS = 4  # sets per window: more, finer expiry but more sets to look through
_MAX_RUNS = 1 << 16  # prompts remembered per engine (`_num_known`)


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
        # Per engine, first key -> (keys, last key, when first touched) of the last prompt
        # touched that began with it: a conversation's next turn extends it, and only its new
        # keys need a step (see `_num_known`).
        self._runs: dict[EngineId, dict[RequestChunkKey, tuple[int, RequestChunkKey, float]]] = {}

    def touch(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        if not keys:
            return
        now = self._clock()
        spans = self._recent.setdefault(engine, deque())
        self._trim(spans, now)
        if not spans or now - spans[-1][0] >= self._span_s:
            spans.append((now, set()))
        opened_at, newest = spans[-1]
        runs = self._runs.setdefault(engine, {})
        num_known = self._num_known(runs, keys, opened_at)  # in `newest` already
        first = keys[0]
        if num_known:
            runs[first] = (len(keys), keys[-1], runs[first][2])
        else:
            if first not in runs and len(runs) >= _MAX_RUNS:
                runs.clear()
            runs[first] = (len(keys), keys[-1], now)
        # Not touched this span yet:
        moved = list(itertools.filterfalse(newest.__contains__, keys[num_known:]))
        if not moved:
            return
        newest.update(moved)
        for _, older in itertools.islice(spans, len(spans) - 1):
            older.difference_update(moved)
        while len(spans) > 1 and sum(len(held) for _, held in spans) > self._max_tracked:
            spans.popleft()  # the oldest set, whole: the bound is coarse, the cost per key nil
            runs.clear()  # their keys may have gone with it

    @staticmethod
    def _num_known(
        runs: dict[RequestChunkKey, tuple[int, RequestChunkKey, float]], keys: Sequence[RequestChunkKey], since: float
    ) -> int:
        """How many leading `keys` were touched together at `since` or later, as the prompt
        touched last that began with the same key (its keys are chained: the same last key,
        the same keys), or 0."""
        earlier = runs.get(keys[0])
        if earlier is None:
            return 0
        num_keys, last, touched_at = earlier
        if touched_at < since or num_keys > len(keys) or keys[num_keys - 1] != last:
            return 0
        return num_keys

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
        if not spans or not keys:
            return len(keys)
        now = self._clock()
        self._trim(spans, now)
        # A prompt this one extends, touched within the window: all its keys are still here.
        num_known = self._num_known(self._runs.get(engine, {}), keys, now - self._window_s)
        missing: Sequence[RequestChunkKey] = keys[num_known:]
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
        self._runs.pop(engine, None)
        return [key for _, held in self._recent.pop(engine, ()) for key in held]
