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

from gateway.kvindex.runs import RecentRuns
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
        # Per engine, the prompts touched, stamped with when they were first touched whole:
        # a conversation's next turn extends one, and only its new keys need a step.
        self._runs: RecentRuns[EngineId] = RecentRuns()

    def touch(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        """The engine was asked to keep `keys` (it stored them: its KV events)."""
        if keys:
            self._move(engine, self._newest(engine)[1], keys)

    def touch_prompt(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        """A prompt's keys, all of them from its first: routed to the engine. One that extends
        the prompt touched last on it with the same first key steps over its new keys only.
        (Only prompts note runs: events' blocks would crowd them out of the bounded memo.)"""
        if not keys:
            return
        opened_at, newest = self._newest(engine)
        # Touched whole since `newest` opened: those keys are in it (no set drops the newest).
        num_known, touched_at = self._runs.covered(engine, keys)
        if touched_at < opened_at:
            num_known = 0
        self._runs.note(engine, keys, touched_at if num_known else self._clock())
        self._move(engine, newest, keys[num_known:])

    def _newest(self, engine: EngineId) -> tuple[float, set[RequestChunkKey]]:
        """The engine's newest set, opened now if its span is over."""
        now = self._clock()
        spans = self._recent.setdefault(engine, deque())
        self._trim(spans, now)
        if not spans or now - spans[-1][0] >= self._span_s:
            spans.append((now, set()))
        return spans[-1]

    def _move(self, engine: EngineId, newest: set[RequestChunkKey], keys: Sequence[RequestChunkKey]) -> None:
        """`keys` into the engine's newest set, `newest`, and out of the others."""
        spans = self._recent[engine]
        moved = list(itertools.filterfalse(newest.__contains__, keys))  # not touched this span yet
        if not moved:
            return
        newest.update(moved)
        for _, older in itertools.islice(spans, len(spans) - 1):
            older.difference_update(moved)
        while len(spans) > 1 and sum(len(held) for _, held in spans) > self._max_tracked:
            spans.popleft()  # the oldest set, whole: the bound is coarse, the cost per key nil
            self._runs.forget(engine)  # their keys may have gone with it

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
        # A prompt this one extends, touched whole within the window: its keys are all here.
        num_known, touched_at = self._runs.covered(engine, keys)
        if touched_at < now - self._window_s:
            num_known = 0
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
        self._runs.forget(engine)
        return [key for _, held in self._recent.pop(engine, ()) for key in held]
