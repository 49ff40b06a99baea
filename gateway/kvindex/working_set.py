"""What each engine has been asked to keep lately: its working set, in chunks.

An engine's KV cache holds `capacity` blocks. The chunks of the requests routed to it within
`window_s` are what it needs resident to keep hitting; when their number exceeds capacity,
the engine's LRU evicts prefixes that are still in use and nothing hits. Routing consults
this to place new prefix groups where they fit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway.types import EngineId, RequestChunkKey


class WorkingSetTracker:
    def __init__(self, window_s: float = 60.0, max_tracked: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._window_s = window_s
        self._max_tracked = max_tracked
        self._clock = clock
        self._recent: dict[EngineId, OrderedDict[RequestChunkKey, float]] = {}

    def touch(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        now = self._clock()
        recent = self._recent.setdefault(engine, OrderedDict())
        for key in keys:
            recent[key] = now
            recent.move_to_end(key)
        while len(recent) > self._max_tracked:
            recent.popitem(last=False)

    def size(self, engine: EngineId) -> int:
        recent = self._recent.get(engine)
        if not recent:
            return 0
        self._trim(recent)
        return len(recent)

    def num_missing(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> int:
        """How many of `keys` are not in the engine's working set (not used within the window).
        A routing decision asks this of every candidate for every chunk of the prompt: once
        what fell out of the window is dropped, the rest is all in it, and one C-level
        intersection counts the keys there (~2/3 of a per-key time check)."""
        recent = self._recent.get(engine)
        if not recent:
            return len(keys)
        self._trim(recent)
        return len(keys) - len(recent.keys() & keys)  # a prompt's chunk keys are distinct

    def _trim(self, recent: OrderedDict[RequestChunkKey, float]) -> None:
        """Drop the keys last used before the window; `recent` is in order of last use."""
        horizon = self._clock() - self._window_s
        while recent:
            oldest_key, last_used = next(iter(recent.items()))
            if last_used >= horizon:
                break
            del recent[oldest_key]

    def forget(self, engine: EngineId) -> list[RequestChunkKey]:
        """Drop the engine's working set; returns the keys it had (routed there lately)."""
        return list(self._recent.pop(engine, {}))
