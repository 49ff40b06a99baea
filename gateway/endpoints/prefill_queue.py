"""How long a request sent to an engine now would wait for the prefills already sent there.

The engine works through our requests about in arrival order (vLLM schedules first come,
first served and cuts long prefills into chunks), so the wait is the predicted prefill of the
requests without a first byte yet, minus the work the engine has done on them since it began.
Counting only the first part, a prefill nearly finished would weigh in full, and the kv_aware
policy would send requests away from an engine about to be free.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class PrefillQueue:
    clock: Callable[[], float] = time.monotonic
    pending_s: float = 0.0  # predicted prefill of the requests waiting for their first byte
    _done_s: float = 0.0  # work done on them up to `_since`
    _since: float = 0.0

    def _done_now(self) -> float:
        if self.pending_s <= 0:
            return 0.0
        return min(self.pending_s, self._done_s + self.clock() - self._since)

    def wait_s(self) -> float:
        return max(0.0, self.pending_s - self._done_now())

    def add(self, seconds: float) -> None:
        self._rebase(self._done_now())
        self.pending_s += seconds

    def adjust(self, seconds: float) -> None:
        """A queued request's prediction changed by `seconds` (a KV transfer gave it more cache)."""
        self._rebase(self._done_now())
        self.pending_s = max(0.0, self.pending_s + seconds)

    def started_answering(self, seconds: float) -> None:
        """A request predicted at `seconds` sent its first byte: its prefill is done, and under
        first come, first served so is the work ahead of it. What the engine did beyond that
        counts for the rest."""
        done = self._done_now()
        self.pending_s = max(0.0, self.pending_s - seconds)
        self._rebase(max(0.0, done - seconds))

    def abandoned(self, seconds: float) -> None:
        """A request predicted at `seconds` left without a first byte (failed, cancelled)."""
        done = self._done_now()
        self.pending_s = max(0.0, self.pending_s - seconds)
        self._rebase(done)

    def _rebase(self, done: float) -> None:
        self._done_s = min(done, self.pending_s)
        self._since = self.clock()
