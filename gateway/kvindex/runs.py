"""The last run of chunk keys each owner (an engine, an engine's tier) wrote, by its first key.

A conversation's next turn sends its whole prompt again, and the structures that note what
was routed where (the index's TTL entries, the working sets) would take every key of it again:
a dictionary step or two a key, ~0.1-0.3 ms at 16k tokens. Keys are chained, so the same key
at the same position means the same keys before it: a prompt whose key at the last run's end
is that run's last key extends it, and the keys the run covers were written already. Bounded
in total, as every request can start a run (speculative entries begin at a new key each time).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from gateway.types import RequestChunkKey

Owner = TypeVar("Owner", bound=Hashable)

_MAX_RUNS = 1 << 16  # in all (~150 B each): more conversations in flight than any engine serves


class RecentRuns(Generic[Owner]):
    def __init__(self, max_runs: int = _MAX_RUNS) -> None:
        self._max_runs = max_runs
        self._num_runs = 0
        # owner -> first key -> (number of keys, last key, the writer's stamp)
        self._by_owner: dict[Owner, dict[RequestChunkKey, tuple[int, RequestChunkKey, float]]] = {}

    def covered(self, owner: Owner, keys: Sequence[RequestChunkKey]) -> tuple[int, float]:
        """How many leading `keys` (not empty) the owner's last run that began with the same
        key covers, and the stamp it was noted with; (0, 0.0) when it does not cover them."""
        runs = self._by_owner.get(owner)
        earlier = runs.get(keys[0]) if runs else None
        if earlier is None:
            return 0, 0.0
        num_keys, last, stamp = earlier
        if num_keys > len(keys) or keys[num_keys - 1] != last:
            return 0, 0.0
        return num_keys, stamp

    def note(self, owner: Owner, keys: Sequence[RequestChunkKey], stamp: float) -> None:
        """The owner wrote `keys` (not empty); `stamp` is the writer's to read back."""
        runs = self._by_owner.setdefault(owner, {})
        if keys[0] not in runs:
            if self._num_runs >= self._max_runs:  # all forgotten: later writes are whole again
                self._by_owner.clear()
                self._num_runs = 0
                runs = self._by_owner[owner] = {}
            self._num_runs += 1
        runs[keys[0]] = (len(keys), keys[-1], stamp)

    def forget(self, owner: Owner) -> None:
        """The owner's runs no longer hold (it lost keys, or they were confirmed)."""
        runs = self._by_owner.pop(owner, None)
        if runs:
            self._num_runs -= len(runs)

    def forget_where(self, matches: Callable[[Owner], bool]) -> None:
        for owner in [o for o in self._by_owner if matches(o)]:
            self.forget(owner)
