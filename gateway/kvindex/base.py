"""The global chunk index: which engine holds which chunk, in which tier."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gateway.types import (
    TIER_APPROXIMATE,
    TIER_CPU,
    TIER_GPU,
    TIER_SPECULATIVE,
    TIER_REPORTED,
    TIER_STORAGE,
    EngineId,
    PrefixMatch,
    RequestChunkKey,
)

__all__ = [
    "TIER_APPROXIMATE", "TIER_CPU", "TIER_GPU", "TIER_REPORTED", "TIER_SPECULATIVE", "TIER_STORAGE", "ChunkIndex",
    "PrefixMatch",
]  # fmt: skip


class ChunkIndex(Protocol):
    """Thread-safety: none; call from the event loop only. Costs are per call."""

    def lookup(
        self, keys: Sequence[RequestChunkKey], engines: Iterable[EngineId] | None = None
    ) -> dict[EngineId, PrefixMatch]:
        """Per engine (restricted to `engines` when given), the longest prefix of `keys` it holds.
        O(len(matched prefix) × engines holding it); stops at the first key nobody holds."""
        ...

    def add(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str, ttl_s: float | None = None) -> None:
        """Record that `engine` holds `keys` in `tier`; with `ttl_s` the entries expire, and
        writing them again renews them, within 1/8 of `ttl_s`: the keys a run written again
        shares with one written less than ttl_s/8 before may keep that one's deadline."""
        ...

    def evict(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str) -> None:
        """`engine` no longer holds `keys` in `tier`. Unknown keys are ignored."""
        ...

    def evict_all_tiers(self, engine: EngineId, keys: Sequence[RequestChunkKey]) -> None:
        """`engine` no longer holds `keys` in any tier. Unknown keys are ignored."""
        ...

    def clear_engine(self, engine: EngineId) -> None:
        """Forget everything about `engine` (restart, lost events). O(entries of engine)."""
        ...

    def num_chunks(self, engine: EngineId, tier: str = TIER_GPU) -> int:
        """How many chunks `engine` holds in `tier`."""
        ...
