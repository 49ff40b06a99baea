"""Recency for the chunk index without per-key bookkeeping: generations of plain dicts.

Why not an LRU in key order: at 5M keys a plain dict costs ~34–67 B per key (its table, by
the power of two it sits at) and an `OrderedDict` adds ~45 B for the linked list that makes
`move_to_end` O(1); the index's budget is 120 B per (chunk, engine) entry, the key's own int
(~40 B) included. So recency is kept as *which dict holds the key* instead of an order:

- `young` holds the keys added or used since it opened. Once it holds capacity / CLOSED_MAX
  keys it closes and a new one opens; `closed` keeps the closed ones, oldest first. Using a
  key of a closed generation moves it into `young` (one pop, one insert); using a young key
  costs nothing.
- A lookup only notes the closed keys it matched (`used`): they move with the next `promote`
  (the next add), which comes before any drop, so the outcome is the same as moving them at
  once, and the request path writes nothing to the tables (but when lookups come with
  hardly any adds: after a generation's worth of such keys, the lookup moves them itself).
- Beyond `capacity` keys, the oldest closed generation loses its keys in the order they
  entered it. At most CLOSED_MAX generations stay closed: a dict never shrinks, so one whose
  keys were mostly used again still holds its whole table; past that many, the oldest is
  dropped whole (its keys went unused while ~capacity keys entered `young`).

Guarantee: a key added or used is kept until at least (1 - 1/CLOSED_MAX) × capacity keys
(¾ of it, less one batch) have entered `young` since. Difference from an exact LRU: using a
young key again does not move it, so a closed generation's keys go in the order of their
first use there, not their last.

Memory: at capacity under churn, the tables of ~(1 + 1/CLOSED_MAX) × capacity keys (the
oldest generation keeps its table while it empties: shrinking it would copy it, ~0.4 s per
2.5M keys of event-loop stall), plus the drop order of the oldest generation (8 B a key of
it).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from itertools import compress, repeat
from typing import Generic, TypeVar, cast

CLOSED_MAX = 4  # more: finer recency and less table held while emptying, but slower misses
_USED_MAX = 1 << 16  # keys noted by lookups between two adds (or a generation's worth)

K = TypeVar("K", bound=Hashable)


class Generations(Generic[K]):
    """key → int (never 0: the index's bitsets, an empty one is no entry), at most `capacity`
    keys after each `shrink`. Callers read and write `young` directly on hot paths, and hold
    no reference to `young` or `closed` across calls."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._generation_size = max(1, capacity // CLOSED_MAX)
        self.young: dict[K, int] = {}
        self.closed: deque[dict[K, int]] = deque()
        self._used: list[K] = []  # matched by lookups in closed generations, in order
        # closed[0]'s keys, oldest first, built at its first drop (a dict has no O(1) "first
        # key" once its front is deleted), and how many were taken. May still name keys since
        # gone from it: skipped.
        self._drop_order: list[K | None] | None = None
        self._dropped_to = 0

    def __len__(self) -> int:
        return len(self.young) + sum(map(len, self.closed))

    def tables(self) -> list[dict[K, int]]:
        return [self.young, *self.closed]

    def holder(self, key: K) -> dict[K, int] | None:
        """The generation holding `key`, for a change that is not a use (an engine evicting
        the chunk): the value is replaced or deleted there and the key does not move."""
        for table in (self.young, *reversed(self.closed)):
            if key in table:
                return table
        return None

    def held(self, keys: Sequence[K]) -> Iterator[tuple[dict[K, int], K]]:
        """Each of `keys` a generation holds, with that generation, for changes that are not
        uses (as `holder`): one C loop a generation, newest first, over the keys not found
        yet. The caller may change or delete the entries it is given as it goes."""
        remaining = keys
        for table in (self.young, *reversed(self.closed)):
            values = list(map(table.get, remaining))
            yield from zip(repeat(table), compress(remaining, values))  # values are never 0
            remaining = list(compress(remaining, map(operator.not_, values)))
            if not remaining:
                return

    def find_closed(self, keys: Sequence[K], found: list[int], start: int) -> int:
        """Fill the gaps of `found` (the values from `young`, 0 where it lacks the key) from
        the closed generations, from position `start` to the first key none holds, and return
        that position (len(keys) if none)."""
        newest_first = list(reversed(self.closed))  # a prompt in use is likelier there
        window = 16  # small first: most prompts end soon after what the engines hold
        low = start
        while low < len(keys):
            high = min(len(keys), low + window)
            part, chunk = found[low:high], keys[low:high]
            for generation in newest_first:
                # A C loop a generation; a key is in one table at most, `get` passes the rest.
                part = list(map(generation.get, chunk, part))
                if 0 not in part:
                    break
            found[low:high] = part
            if 0 in part:
                return low + part.index(0)
            low, window = high, 2 * window
        return len(keys)

    def used(self, keys: Iterable[K]) -> list[int]:
        """A lookup matched `keys`; those in closed generations move into `young` with the
        next `promote` or `shrink`. After a generation's worth of them (lookups with few adds
        between: requests refused after their lookup), a `shrink` at once, whose drops it
        returns: it closes `young` when full and lets go of the tables emptied by uses, which
        would otherwise pile up until the next add."""
        self._used.extend(keys)
        if len(self._used) >= min(_USED_MAX, self._generation_size):
            return self.shrink()
        return []

    def promote(self, keys: Sequence[K]) -> None:
        """The keys noted by `used`, then `keys`, are used: those a closed generation holds
        move into `young`, in that order."""
        if self._used:
            keys, self._used = [*self._used, *keys], []
        # Every closed generation is probed for a new key (one cache miss or more each, at
        # millions of keys): that, not Python, is most of what this costs.
        values: list[int | None] | None = None
        for generation in reversed(self.closed):
            if generation.keys().isdisjoint(keys):  # the usual case for new keys: no list built
                continue
            values = list(map(generation.pop, keys, values or repeat(None)))  # as in `find_closed`
            if None not in values:
                break
        if values is not None:
            self.young.update(cast("Iterator[tuple[K, int]]", compress(zip(keys, values), values)))

    def shrink(self) -> list[int]:
        """Close `young` when full, then drop keys until `capacity` and CLOSED_MAX hold; the
        values dropped. Cheap when nothing is due: call after every batch of inserts."""
        if not self.closed and len(self.young) < self._generation_size:
            return []  # filling the first generation: nothing noted by lookups (all young)
        if self._used:
            self.promote(())  # uses first: they decide what goes
        self._close_if_full()
        closed = self.closed
        if not all(closed):  # emptied by uses: no key left, but a whole table
            if not closed[0]:
                self._drop_order = None
            closed = self.closed = deque(filter(None, closed))
        dropped: list[int] = []
        while len(closed) > CLOSED_MAX:
            dropped.extend(closed.popleft().values())
            self._drop_order = None
        excess = len(self) - self.capacity  # > 0 only with closed generations: young < capacity
        while excess > 0:
            oldest = closed[0]
            if self._drop_order is None or self._dropped_to >= len(self._drop_order):
                self._drop_order, self._dropped_to = list(oldest), 0  # O(len): ~10 ms at 1.25M
            taken = slice(self._dropped_to, self._dropped_to + excess)
            names = cast("list[K]", self._drop_order[taken])  # not taken before: no None
            self._drop_order[taken] = repeat(None, len(names))  # lets the dropped keys' ints go
            self._dropped_to += len(names)
            values = list(filter(None, map(oldest.pop, names, repeat(None))))
            dropped += values
            excess -= len(values)
            if not oldest:
                closed.popleft()
                self._drop_order = None
        return dropped

    def _close_if_full(self) -> None:
        """After each batch of keys entering `young` (the guarantee above rests on it)."""
        if len(self.young) >= self._generation_size:
            self.closed.append(self.young)
            self.young = {}
