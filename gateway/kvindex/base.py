"""The global chunk index: which engine holds which chunk, in which tier."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.types import EngineId, RequestChunkKey

# Tiers as vLLM names the medium of a block, plus two the gateway writes itself.
TIER_GPU = "GPU"  # engine device memory (vLLM calls it GPU on the CPU backend too)
TIER_CPU = "CPU"  # engine-side CPU offload
TIER_STORAGE = "STORAGE"  # external store
TIER_SPECULATIVE = "speculative"  # just routed there; the engine's events are on their way
TIER_APPROXIMATE = "approximate"  # routed there, engine publishes no events (TTL-bounded guess)


@dataclass(slots=True)
class PrefixMatch:
    """Longest consecutive run of a request's chunks, from its first, that an engine holds."""

    num_chunks: int = 0  # in any tier
    by_tier: dict[str, int] = field(default_factory=dict)


class ChunkIndex(Protocol):
    """Thread-safety: none; call from the event loop only. Costs are per call."""

    def lookup(
        self, keys: Sequence[RequestChunkKey], engines: Iterable[EngineId] | None = None
    ) -> dict[EngineId, PrefixMatch]:
        """Per engine (restricted to `engines` when given), the longest prefix of `keys` it holds.
        O(len(matched prefix) × engines holding it); stops at the first key nobody holds."""
        ...

    def add(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str, ttl_s: float | None = None) -> None:
        """Record that `engine` holds `keys` in `tier`; with `ttl_s` the entries expire."""
        ...

    def evict(self, engine: EngineId, keys: Sequence[RequestChunkKey], tier: str) -> None:
        """`engine` no longer holds `keys` in `tier`. Unknown keys are ignored."""
        ...

    def clear_engine(self, engine: EngineId) -> None:
        """Forget everything about `engine` (restart, lost events). O(entries of engine)."""
        ...

    def num_chunks(self, engine: EngineId, tier: str = TIER_GPU) -> int:
        """How many chunks `engine` holds in `tier`."""
        ...
