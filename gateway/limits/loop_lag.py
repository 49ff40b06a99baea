"""How far behind its event loop a worker runs: the sign that requests arrive faster than the
worker can even read and answer them (`limits.max_event_loop_lag_s`).

A timer due every `interval_s` notes how late it fires. A burst of requests delays a few ticks
and is gone; a worker offered more than its core does never catches up, and every tick is late.
`standing_s` tells the two apart as CoDel does: the smallest lateness over the last whole
`window_s`. A loop that was on time once in the window has no standing queue (0); one that
never was has at least that much work ahead of every callback, each request's included. A
window with a single tick is a single stall (a long garbage collection, a blocking call), not a
queue: it counts as 0.

Cost: one timer callback per `interval_s` (200 a second at 5 ms), a clock read and two
comparisons each; `standing_s` is a field read, `late_now_s` (how far the pass running now has
gone past the next tick) a clock read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 0.005
DEFAULT_WINDOW_S = 0.1


class EventLoopLag:
    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._window_s = window_s
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._window_ends = 0.0
        self._window_min_s = float("inf")
        self._window_ticks = 0
        # The last whole window's smallest lateness (0 until one has passed).
        self.standing_s = 0.0
        self.num_windows = 0  # closed so far: a reader notices when the next one closes

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            return
        now = self._clock()
        self.start_at(now)
        self._schedule(loop, now)

    def start_at(self, now: float) -> None:
        """The first window begins at `now` (`start` does it; tests that feed `observe`, too)."""
        self._window_ends = now + self._window_s

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.standing_s = 0.0

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._due = now + self._interval_s
        self._timer = loop.call_later(self._interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        self.observe(now, max(0.0, now - self._due))
        # From now, not from when it was due: a stalled loop gets one late tick, not a burst.
        self._schedule(loop, now)

    def late_now_s(self) -> float:
        """How late the tick due next is already (0 when it is not due yet, or not running):
        how far the pass of the loop now running has gone past it."""
        return max(0.0, self._clock() - self._due) if self._timer is not None else 0.0

    def observe(self, now: float, late_s: float) -> None:
        """A tick `late_s` late at `now` (the timer's; tests call it with their own)."""
        if late_s < self._window_min_s:
            self._window_min_s = late_s
        self._window_ticks += 1
        if now >= self._window_ends:
            self.standing_s = self._window_min_s if self._window_ticks > 1 else 0.0
            self.num_windows += 1
            self._window_min_s = float("inf")
            self._window_ticks = 0
            self._window_ends = now + self._window_s
