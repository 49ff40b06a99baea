"""Domain events: what the gateway needs to know about an engine's cache, in no engine's
wire format. Hashes here are the *engine's* block hashes; the gateway maps them to its own
chunk keys (see docs/architecture.md, "dual keys")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType, Union

# vLLM sends 64-bit ints by default and bytes with some hash settings; both are hashable.
EngineBlockHash = NewType("EngineBlockHash", object)


@dataclass(frozen=True, slots=True)
class ChunkStored:
    block_hashes: tuple[EngineBlockHash, ...]
    parent_block_hash: EngineBlockHash | None
    token_ids: tuple[int, ...]  # len == block_size * len(block_hashes)
    block_size: int
    medium: str  # tier: "GPU" (device memory), "CPU" (offload), "STORAGE" (external)
    lora_name: str | None = None
    cache_salt: str | None = None  # only on a chain's first block


@dataclass(frozen=True, slots=True)
class ChunkRemoved:
    block_hashes: tuple[EngineBlockHash, ...]
    medium: str


@dataclass(frozen=True, slots=True)
class AllChunksCleared:
    pass


CacheEvent = Union[ChunkStored, ChunkRemoved, AllChunksCleared]


@dataclass(frozen=True, slots=True)
class EventBatch:
    seq: int
    ts: float
    events: tuple[CacheEvent, ...] = field(default_factory=tuple)
    data_parallel_rank: int | None = None
