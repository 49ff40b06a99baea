"""Shared vocabulary of the request path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NewType

if TYPE_CHECKING:
    from gateway.routing.ttft import TTFTEstimate

EngineId = NewType("EngineId", str)
# The gateway's own chained chunk keys (from token ids); never mixed with engine block
# hashes, which arrive in KV events (engine_adapter.events.model.EngineBlockHash).
RequestChunkKey = NewType("RequestChunkKey", int)

# Tiers as vLLM names the medium of a block, plus two the gateway writes itself.
TIER_GPU = "GPU"  # engine device memory (vLLM calls it GPU on the CPU backend too)
TIER_CPU = "CPU"  # engine-side CPU offload
TIER_STORAGE = "STORAGE"  # external store
TIER_SPECULATIVE = "speculative"  # just routed there; the engine's events are on their way
TIER_APPROXIMATE = "approximate"  # routed there, engine publishes no events (TTL-bounded guess)
# The engine reported this prefix as cached (usage.prompt_tokens_details) though the index did
# not know it: held before the gateway subscribed, or events lost. TTL-bounded, as no
# BlockRemoved can name it.
TIER_REPORTED = "reported"


@dataclass(slots=True)
class PrefixMatch:
    """Longest consecutive run of a request's chunks, from its first, that an engine holds.
    Read only: the index hands the same match to every lookup that finds it (build a new one to
    change it)."""

    num_chunks: int = 0  # in any tier
    by_tier: Mapping[str, int] = field(default_factory=dict)

    @property
    def own_chunks(self) -> int:
        """The chunks the engine holds itself, a shared store's run left out (it loads those
        from the store when asked, gateway.kvindex.stores)."""
        if TIER_STORAGE not in self.by_tier:
            return self.num_chunks
        return max((run for tier, run in self.by_tier.items() if tier != TIER_STORAGE), default=0)

    @property
    def store_chunks(self) -> int:
        return self.by_tier.get(TIER_STORAGE, 0)


def cached_prefix_tokens(num_chunks: int, num_prompt_tokens: int, block_size: int) -> int:
    """The prompt tokens an engine holding `num_chunks` leading chunks serves from its cache,
    as vLLM counts them: whole blocks, and never the prompt's last token (it always computes
    at least one)."""
    if num_prompt_tokens <= 0 or block_size <= 0:
        return 0
    return min(num_chunks, (num_prompt_tokens - 1) // block_size) * block_size


@dataclass(slots=True)
class RoutingRequest:
    """What policies see of one request: never the raw HTTP objects."""

    model: str
    api_path: str  # e.g. "/v1/chat/completions"
    body: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    request_id: str
    stream: bool = False
    # Engines already tried for this request (retries exclude them).
    excluded: set[EngineId] = field(default_factory=set)
    # The one engine that can serve it (Responses API: the engine that stored the
    # `previous_response_id`); the router offers only it while it is a candidate.
    pinned_engine: EngineId | None = None
    # Filled by the prefix service before routing (None: no routable prompt).
    num_prompt_tokens: int | None = None
    token_ids: Sequence[int] = field(default_factory=list)
    chunk_keys: list[RequestChunkKey] = field(default_factory=list)
    # Chunks of the prompt beyond `chunk_keys`: its tail, left untokenized because no engine
    # holds its start (gateway.tokenization.head); `num_prompt_tokens` is then an estimate.
    num_unread_chunks: int = 0
    num_prompt_tokens_estimated: bool = False
    # Per engine, the longest prefix of chunk_keys it holds (one index lookup per request).
    prefix_matches: dict[EngineId, PrefixMatch] = field(default_factory=dict)
    # Shared stores' announcements seen when `prefix_matches` was looked up (StoreWrites.seq).
    store_writes_seq: int = 0
    # Per engine, the time to first token the kv_aware scorer estimated (and the way: recompute
    # or a KV transfer); the transfer step executes what was estimated for the chosen engine.
    ttft_estimates: dict[EngineId, TTFTEstimate] = field(default_factory=dict)
