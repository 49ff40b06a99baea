"""Per request: prompt → token ids → chunk keys → one index lookup; after routing, the
speculative (or approximate) entries and working-set update for the chosen engine."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_APPROXIMATE, TIER_SPECULATIVE, ChunkIndex, PrefixMatch
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.tokenization.tokenizer import PromptTokenizer
from gateway.types import EngineId, RoutingRequest


class PrefixService:
    def __init__(
        self,
        index: ChunkIndex,
        tokenizers: Mapping[str, PromptTokenizer],
        default_tokenizer: PromptTokenizer | None,
        registry: EndpointRegistry,
        working_sets: WorkingSetTracker,
        *,
        block_size: int,
        speculative_ttl_s: float,
        approximate_ttl_s: float,
    ) -> None:
        self.index = index
        self._tokenizers = dict(tokenizers)
        self._default_tokenizer = default_tokenizer
        self._registry = registry
        self.working_sets = working_sets
        self.block_size = block_size
        self._speculative_ttl_s = speculative_ttl_s
        self._approximate_ttl_s = approximate_ttl_s

    async def annotate(self, request: RoutingRequest) -> None:
        """Fill the request's token count, chunk keys and per-engine prefix matches."""
        tokenizer = self._tokenizers.get(request.model, self._default_tokenizer)
        if tokenizer is None:
            return
        token_ids = await tokenizer.token_ids(request.api_path, request.body)
        if not token_ids:
            return
        request.num_prompt_tokens = len(token_ids)
        request.token_ids = token_ids
        base_model, lora_name = self._registry.base_model(request.model)
        salt = request.body.get("cache_salt")
        root = chain_root(base_model, lora_name, salt if isinstance(salt, str) else None)
        request.chunk_keys = chunk_keys(token_ids, self.block_size, root)
        request.prefix_matches = self.index.lookup(request.chunk_keys) if request.chunk_keys else {}

    def predicted_cached_tokens(self, request: RoutingRequest, engine: EngineId) -> int:
        """What the engine should report as cached: whole matched blocks, and never the
        prompt's last token (vLLM always computes at least one)."""
        match = request.prefix_matches.get(engine)
        if match is None or request.num_prompt_tokens is None:
            return 0
        max_blocks = (request.num_prompt_tokens - 1) // self.block_size
        return min(match.num_chunks, max_blocks) * self.block_size

    def record_routed(self, request: RoutingRequest, endpoint: Endpoint) -> None:
        if not request.chunk_keys:
            return
        if endpoint.kv_events_endpoint is not None:
            self.index.add(endpoint.id, request.chunk_keys, TIER_SPECULATIVE, ttl_s=self._speculative_ttl_s)
        else:
            self.index.add(endpoint.id, request.chunk_keys, TIER_APPROXIMATE, ttl_s=self._approximate_ttl_s)
        self.working_sets.touch(endpoint.id, request.chunk_keys)

    def record_transferred(self, request: RoutingRequest, endpoint: Endpoint, prefix_tokens: int) -> None:
        """`endpoint` now holds the request's first `prefix_tokens` (a KV transfer): a
        speculative entry until its own BlockStored events confirm it, and the request's
        match updated so the prediction checked against the engine's answer is right."""
        num_chunks = prefix_tokens // self.block_size
        keys = request.chunk_keys[:num_chunks]
        if not keys:
            return
        self.index.add(endpoint.id, keys, TIER_SPECULATIVE, ttl_s=self._speculative_ttl_s)
        match = request.prefix_matches.get(endpoint.id) or PrefixMatch()
        if num_chunks > match.num_chunks:
            by_tier = dict(match.by_tier)
            by_tier[TIER_SPECULATIVE] = max(by_tier.get(TIER_SPECULATIVE, 0), num_chunks)
            request.prefix_matches[endpoint.id] = PrefixMatch(num_chunks=num_chunks, by_tier=by_tier)

    def match(self, request: RoutingRequest, engine: EngineId) -> PrefixMatch:
        return request.prefix_matches.get(engine) or PrefixMatch()
