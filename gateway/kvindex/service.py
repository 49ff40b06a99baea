"""Per request: prompt → token ids → chunk keys → one index lookup; after routing, the
speculative (or approximate) entries and working-set update for the chosen engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.elastic.hot_prefixes import HotPrefixes
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import (
    TIER_APPROXIMATE,
    TIER_REPORTED,
    TIER_SPECULATIVE,
    TIER_STORAGE,
    ChunkIndex,
    PrefixMatch,
)
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.stores import StoreWrites, store_holder, with_store_hits
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.tokenization.chunking import RecentChains, chain_root, chunk_keys
from gateway.tokenization.tokenizer import PromptTokenizer, TokenizationFailed
from gateway.types import EngineId, RequestChunkKey, RoutingRequest, cached_prefix_tokens

logger = logging.getLogger(__name__)

# A model whose prompts cannot be tokenized is logged at most this often (it is also counted).
_FAILURE_LOG_INTERVAL_S = 60.0


class TokenizerLookup(Protocol):
    def for_model(self, model: str) -> PromptTokenizer: ...


class PrefixService:
    def __init__(
        self,
        index: ChunkIndex,
        tokenizers: TokenizerLookup,
        registry: EndpointRegistry,
        working_sets: WorkingSetTracker,
        layout: KVLayout,
        *,
        speculative_ttl_s: float,
        approximate_ttl_s: float,
        on_tokenize_failure: Callable[[str], None] | None = None,
        store_writes: StoreWrites | None = None,
        hot: HotPrefixes | None = None,
    ) -> None:
        self.index = index
        self._tokenizers = tokenizers
        self._registry = registry
        self.working_sets = working_sets
        self.layout = layout
        self._speculative_ttl_s = speculative_ttl_s
        self._approximate_ttl_s = approximate_ttl_s
        self._on_tokenize_failure = on_tokenize_failure
        # When shared stores' chunks were announced (the ingestor's): see learn_store_miss.
        self._store_writes = store_writes or StoreWrites(0)
        # The prompts routed lately, with their token ids (gateway.elastic).
        self._hot = hot
        self._failure_logged_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._chains = RecentChains()  # a prompt's keys from the last one it extends

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    async def annotate(self, request: RoutingRequest) -> None:
        """Fill the request's token count, chunk keys and per-engine prefix matches."""
        if not self.layout.known:
            return
        tokenizer = self._tokenizers.for_model(request.model)
        root = self._chain_root(request)
        request.store_writes_seq = self._store_writes.seq
        looked_up: list[tuple[list[RequestChunkKey], dict[EngineId, PrefixMatch]]] = []

        def head_is_enough(head_ids: Sequence[int]) -> bool:
            # Chained keys: a chunk of the head that no engine holds ends every match, so the
            # rest of the prompt cannot add to any. Otherwise the whole prompt is needed.
            keys = chunk_keys(head_ids, self.block_size, root)
            if not keys:
                return False
            matches = self.lookup(keys)
            if any(m.num_chunks >= len(keys) for m in matches.values()):
                return False
            looked_up.append((keys, matches))
            return True

        try:
            tokens = await tokenizer.prompt_tokens(request.model, request.api_path, request.body, head_is_enough)
        except TokenizationFailed as exc:
            self._tokenize_failed(request.model, str(exc))
            return
        if tokens is None or not tokens.ids:
            return
        request.num_prompt_tokens = tokens.num_tokens
        request.token_ids = tokens.ids
        if tokens.complete:
            request.chunk_keys = self._chains.chunk_keys(tokens.ids, self.block_size, root)
            request.prefix_matches = self.lookup(request.chunk_keys) if request.chunk_keys else {}
        else:
            request.chunk_keys, request.prefix_matches = looked_up[-1]
            request.num_prompt_tokens_estimated = True
            request.num_unread_chunks = max(0, tokens.num_tokens // self.block_size - len(request.chunk_keys))

    def lookup(self, keys: Sequence[RequestChunkKey]) -> dict[EngineId, PrefixMatch]:
        """Per engine, the longest prefix of `keys` it holds, a shared store's included."""
        matches = self.index.lookup(keys)
        with_store_hits(matches, self._registry.store_attachments)
        return matches

    def _tokenize_failed(self, model: str, reason: str) -> None:
        if self._on_tokenize_failure is not None:
            self._on_tokenize_failure(model)
        now = time.monotonic()
        if now - self._failure_logged_at.get(model, -_FAILURE_LOG_INTERVAL_S) >= _FAILURE_LOG_INTERVAL_S:
            self._failure_logged_at[model] = now
            logger.warning("model %s: routing a request without prefix knowledge, its prompt could not be "
                           "tokenized: %s", model, reason)  # fmt: skip

    def predicted_cached_tokens(self, request: RoutingRequest, engine: EngineId) -> int:
        """What the engine should report as cached: whole matched blocks, and never the
        prompt's last token (vLLM always computes at least one)."""
        match = request.prefix_matches.get(engine)
        if match is None or request.num_prompt_tokens is None:
            return 0
        return cached_prefix_tokens(match.num_chunks, request.num_prompt_tokens, self.block_size)

    def record_routed(self, request: RoutingRequest, endpoint: Endpoint) -> None:
        if not request.chunk_keys:
            return
        if endpoint.kv_events_endpoint is not None:
            # Until the engine's own events say it stored this prompt's blocks, a speculative
            # entry stands in for the ones it did not hold: the matched prefix is there already
            # (a long conversation's next turn adds a few chunks, not all of them again).
            # (Its own run: a shared store's it loads, and announces once it holds it.)
            match = request.prefix_matches.get(endpoint.id)
            new_keys = request.chunk_keys[match.own_chunks :] if match is not None else request.chunk_keys
            if new_keys:
                self.index.add(endpoint.id, new_keys, TIER_SPECULATIVE, ttl_s=self._speculative_ttl_s)
        else:
            self.index.add(endpoint.id, request.chunk_keys, TIER_APPROXIMATE, ttl_s=self._approximate_ttl_s)
        self.working_sets.touch_prompt(endpoint.id, request.chunk_keys)
        if self._hot is not None and not request.num_prompt_tokens_estimated:
            self._hot.note(request.model, request.token_ids, request.chunk_keys, self.block_size)

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

    def learn_reported(self, request: RoutingRequest, engine: EngineId, cached_tokens: int) -> None:
        """The engine served `cached_tokens` of this prompt from its cache: it holds that prefix,
        whatever the index thought (the index repairs itself from what engines report)."""
        num_chunks = cached_tokens // self.block_size if self.block_size else 0
        if num_chunks > len(request.chunk_keys) and request.num_prompt_tokens_estimated:
            # Routed on its head, but the engine holds more (this gateway restarted, or did not
            # send it there itself): the whole prompt is needed after all. Rare, and after the fact.
            task = asyncio.get_running_loop().create_task(self._learn_whole(request, engine, num_chunks))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        keys = request.chunk_keys[:num_chunks]
        if keys:
            self.index.add(engine, keys, TIER_REPORTED, ttl_s=self._approximate_ttl_s)

    def learn_store_miss(self, request: RoutingRequest, engine: EngineId, cached_tokens: int) -> None:
        """The engine served only `cached_tokens` of a prefix its shared store was thought to
        hold further: the store evicted the rest (LMCache's fast mode announces no evictions),
        so the store's entries from there to the end of its run go, for every engine."""
        store = self._registry.store_of(engine)
        match = request.prefix_matches.get(engine)
        if store is None or match is None or not self.block_size:
            return
        served = cached_tokens // self.block_size
        run = match.store_chunks
        missed = request.chunk_keys[served:run]
        # Written again since the lookup (the engine recomputed them and stored them anew): kept.
        if missed and not self._store_writes.written_after(missed, request.store_writes_seq):
            self.index.evict(store_holder(store), missed, TIER_STORAGE)

    async def _learn_whole(self, request: RoutingRequest, engine: EngineId, num_chunks: int) -> None:
        tokenizer = self._tokenizers.for_model(request.model)
        try:
            tokens = await tokenizer.prompt_tokens(request.model, request.api_path, request.body)
        except TokenizationFailed:
            return
        if tokens is not None:
            keys = chunk_keys(tokens.ids, self.block_size, self._chain_root(request))[:num_chunks]
            self.index.add(engine, keys, TIER_REPORTED, ttl_s=self._approximate_ttl_s)

    def _chain_root(self, request: RoutingRequest) -> int:
        base_model, lora_name = self._registry.base_model(request.model)
        salt = request.body.get("cache_salt")
        return chain_root(base_model, lora_name, salt if isinstance(salt, str) else None)

    def match(self, request: RoutingRequest, engine: EngineId) -> PrefixMatch:
        return request.prefix_matches.get(engine) or PrefixMatch()

