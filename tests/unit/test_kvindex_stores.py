"""A shared KV store as one tier: 256-token store chunks land under the engines' block-size
keys, for every engine attached to the store, whichever engine wrote them."""

from __future__ import annotations

from engine_adapter.events.model import ChunkRemoved, ChunkStored, EventBatch
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_CPU, TIER_GPU, TIER_STORAGE
from gateway.kvindex.ingest import IndexIngestor
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.service import PrefixService
from gateway.kvindex.stores import store_holder, with_store_hits
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.types import EngineId, PrefixMatch, RoutingRequest

BLOCK = 4
STORE_CHUNK = 16  # 4 blocks per store chunk, as LMCache's 256 tokens are 8 blocks of 32
A, B, C = EngineId("a"), EngineId("b"), EngineId("c")
PROMPT = list(range(2000, 2000 + 3 * STORE_CHUNK + 5))  # 3 store chunks, 12 blocks and a rest


def fleet() -> tuple[InMemoryIndex, IndexIngestor, PrefixService]:
    registry = EndpointRegistry([
        Endpoint(id=A, url="http://a", kv_store="s1", configured_models=frozenset({"m"})),
        Endpoint(id=B, url="http://b", kv_store="s1", configured_models=frozenset({"m"})),
        Endpoint(id=C, url="http://c", configured_models=frozenset({"m"})),
    ])  # fmt: skip
    index = InMemoryIndex()
    layout = KVLayout(BLOCK)
    ingestor = IndexIngestor(index, layout, registry.model_of, store_of=registry.store_of)
    prefix = PrefixService(index, OneTokenizer(), registry, WorkingSetTracker(), layout,
                           speculative_ttl_s=10, approximate_ttl_s=10, store_writes=ingestor.store_writes)  # fmt: skip
    return index, ingestor, prefix


class OneTokenizer:
    def for_model(self, model: str) -> object:
        raise AssertionError("not tokenized in these tests")


def store_chunk(number: int, parent: int | None, medium: str = TIER_CPU) -> ChunkStored:
    """The `number`-th 256-token-like chunk of PROMPT, as LMCache's connector announces it."""
    tokens = tuple(PROMPT[number * STORE_CHUNK : (number + 1) * STORE_CHUNK])
    return ChunkStored((900 + number,), parent, tokens, STORE_CHUNK, medium)


def batch(*events: object) -> EventBatch:
    return EventBatch(seq=0, ts=0.0, events=tuple(events))  # type: ignore[arg-type]


def keys() -> list:
    return chunk_keys(PROMPT, BLOCK, chain_root("m"))


def runs(prefix: PrefixService) -> dict[EngineId, int]:
    return {engine: match.num_chunks for engine, match in prefix.lookup(keys()).items()}


def test_a_store_chunk_becomes_the_engines_block_keys_for_every_attached_engine() -> None:
    index, ingestor, prefix = fleet()
    ingestor.apply("a", batch(store_chunk(0, None), store_chunk(1, 900)))
    # 2 store chunks = 8 blocks, under exactly the keys a request computes, for a and b alike.
    assert runs(prefix) == {A: 8, B: 8}
    matches = prefix.lookup(keys())
    assert matches[B].by_tier == {TIER_STORAGE: 8}
    assert index.lookup(keys()[:8]) == {store_holder("s1"): PrefixMatch(8, {TIER_STORAGE: 8})}
    assert index.num_chunks(A, TIER_STORAGE) == 0  # recorded once, for the store
    assert ingestor.store_chunks("s1") == 2


def test_a_chunk_whose_parent_another_engine_wrote_still_chains() -> None:
    _, ingestor, prefix = fleet()
    ingestor.apply("a", batch(store_chunk(0, None)))
    # LMCache's fast mode: b announces only what it wrote itself, chunk 2 after a's chunk 0 and 1.
    ingestor.apply("b", batch(store_chunk(1, 900), store_chunk(2, 901)))
    assert runs(prefix) == {A: 12, B: 12}
    assert ingestor.stats.orphan_blocks == 0


def test_an_engine_gets_the_longer_of_its_own_run_and_the_stores() -> None:
    index, ingestor, prefix = fleet()
    ingestor.apply("a", batch(store_chunk(0, None)))  # store: 4 blocks
    index.add(A, keys()[:10], TIER_GPU)  # a's own memory: 10 blocks
    index.add(C, keys()[:2], TIER_GPU)
    matches = prefix.lookup(keys())
    assert matches[A].num_chunks == 10 and matches[A].by_tier == {TIER_GPU: 10, TIER_STORAGE: 4}
    assert matches[B].num_chunks == 4
    assert matches[C].num_chunks == 2 and TIER_STORAGE not in matches[C].by_tier  # not attached
    # The index shares its matches between lookups: the store's run went into a new one.
    assert index.lookup(keys())[A] == PrefixMatch(10, {TIER_GPU: 10})


def test_store_evictions_and_misses_remove_the_chunks_for_everyone() -> None:
    index, ingestor, prefix = fleet()
    ingestor.apply("a", batch(store_chunk(0, None), store_chunk(1, 900), store_chunk(2, 901)))
    # lmcache_driven mode announces evictions; the middle chunk gone ends the run there.
    ingestor.apply("b", batch(ChunkRemoved((901,), TIER_CPU)))
    assert runs(prefix) == {A: 4, B: 4}
    assert ingestor.store_chunks("s1") == 2
    # Fast mode announces none: an engine that served less than the store's run corrects it.
    request = routed(prefix, ingestor)
    prefix.learn_store_miss(request, B, cached_tokens=2 * BLOCK)
    assert runs(prefix) == {A: 2, B: 2}


def test_a_miss_does_not_undo_chunks_written_again_after_the_lookup() -> None:
    _, ingestor, prefix = fleet()
    ingestor.apply("a", batch(store_chunk(0, None), store_chunk(1, 900)))
    request = routed(prefix, ingestor)
    # The store had evicted chunk 1: b recomputes it, stores it again and says so, then reports.
    ingestor.apply("b", batch(store_chunk(1, 900)))
    prefix.learn_store_miss(request, B, cached_tokens=STORE_CHUNK)
    assert runs(prefix) == {A: 8, B: 8}
    # Without the new write, the same report drops it.
    request = routed(prefix, ingestor)
    prefix.learn_store_miss(request, B, cached_tokens=STORE_CHUNK)
    assert runs(prefix) == {A: 4, B: 4}


def routed(prefix: PrefixService, ingestor: IndexIngestor) -> RoutingRequest:
    """A request as the prefix service leaves it for routing (its annotate, without a tokenizer)."""
    request = RoutingRequest(model="m", api_path="/v1/completions", body={}, headers={}, request_id="r")
    request.chunk_keys = keys()
    request.prefix_matches = prefix.lookup(keys())
    request.store_writes_seq = ingestor.store_writes.seq
    return request


def test_store_chunks_not_a_multiple_of_the_block_size_are_refused() -> None:
    _, ingestor, prefix = fleet()
    odd = ChunkStored((1,), None, tuple(PROMPT[:6]), 6, TIER_CPU)
    ingestor.apply("a", batch(odd))
    assert runs(prefix) == {} and ingestor.stats.block_size_mismatches == 1


def test_an_engine_outside_any_store_keeps_its_cpu_tier_to_itself() -> None:
    index, ingestor, _ = fleet()
    ingestor.apply("c", batch(ChunkStored((1,), None, tuple(PROMPT[:BLOCK]), BLOCK, TIER_CPU)))
    assert index.lookup(keys()) == {C: PrefixMatch(1, {TIER_CPU: 1})}


def test_expansion_drops_the_pseudo_holders_and_asks_attachments_only_when_needed() -> None:
    asked: list[int] = []

    def attached() -> list[tuple[EngineId, str]]:
        asked.append(1)
        return [(A, "s1")]

    plain = {B: PrefixMatch(3, {TIER_GPU: 3})}
    with_store_hits(plain, attached)
    assert plain == {B: PrefixMatch(3, {TIER_GPU: 3})} and asked == []
    held = {store_holder("s1"): PrefixMatch(5, {TIER_STORAGE: 5}), store_holder("s2"): PrefixMatch(9, {TIER_STORAGE: 9})}
    with_store_hits(held, attached)
    assert held == {A: PrefixMatch(5, {TIER_STORAGE: 5})} and asked == [1]
