"""The dual-key bridge: engine events (engine block hashes + token ids) must land in the index
under exactly the keys a request computes from its own tokens."""

from __future__ import annotations

import msgpack

from engine_adapter.events.decoder import decode_batch
from engine_adapter.events.model import AllChunksCleared, ChunkRemoved, ChunkStored, EventBatch
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.base import TIER_CPU, TIER_GPU
from gateway.kvindex.ingest import IndexIngestor
from gateway.kvindex.memory import InMemoryIndex
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.types import EngineId

BLOCK = 4
A, B = EngineId("a"), EngineId("b")
MODELS = {"a": "model-x", "b": "model-x"}
PROMPT = list(range(1000, 1000 + 6 * BLOCK + 2))  # 6 full chunks and a partial one


def setup(on_reset: list[tuple[str, str]] | None = None) -> tuple[InMemoryIndex, IndexIngestor]:
    index = InMemoryIndex()
    callback = None if on_reset is None else (lambda engine, reason: on_reset.append((engine, reason)))
    return index, IndexIngestor(index, KVLayout(BLOCK), MODELS.get, on_reset=callback)


def stored(hashes: list[object], parent: object, tokens: list[int], medium: str = TIER_GPU, *,
           lora: str | None = None, salt: str | None = None, block_size: int = BLOCK) -> ChunkStored:  # fmt: skip
    return ChunkStored(tuple(hashes), parent, tuple(tokens), block_size, medium, lora, salt)


def batch(*events: object, seq: int = 0) -> EventBatch:
    return EventBatch(seq=seq, ts=0.0, events=tuple(events))  # type: ignore[arg-type]


def request_keys(tokens: list[int], model: str = "model-x", lora: str | None = None, salt: str | None = None) -> list:
    """What the request path (gateway.kvindex.service) computes for a prompt."""
    return chunk_keys(tokens, BLOCK, chain_root(model, lora, salt))


def matched(index: InMemoryIndex, keys: list, engine: EngineId = A) -> int:
    match = index.lookup(keys).get(engine)
    return 0 if match is None else match.num_chunks


def lengths(matches: dict) -> dict:
    return {e: m.num_chunks for e, m in matches.items()}


def test_stored_chain_gets_request_side_keys() -> None:
    index, ingestor = setup()
    ingestor.apply("a", batch(stored([101, 102, 103], None, PROMPT[: 3 * BLOCK])))
    keys = request_keys(PROMPT)
    assert matched(index, keys) == 3
    assert index.num_chunks(A) == 3
    assert ingestor.stats.blocks_stored == 3
    assert ingestor.known_blocks(A) == 3
    # Not just "some" keys: exactly the request's first three, each under its own key.
    assert len(index) == 3
    assert all(matched(index, [key]) == 1 for key in keys[:3])


def test_chain_continued_in_a_second_event_uses_parent_hash() -> None:
    index, ingestor = setup()
    ingestor.apply("a", batch(stored([101, 102], None, PROMPT[: 2 * BLOCK])))
    # A later batch: the parent is the last engine hash of the first event.
    ingestor.apply("a", batch(stored([103, 104, 105], 102, PROMPT[2 * BLOCK : 5 * BLOCK]), seq=1))
    keys = request_keys(PROMPT)
    assert matched(index, keys) == 5
    # Parent in the middle of a chain: a branch after the first block.
    branch = PROMPT[:BLOCK] + [7] * (2 * BLOCK)
    ingestor.apply("a", batch(stored([201, 202], 101, branch[BLOCK:]), seq=2))
    assert matched(index, request_keys(branch)) == 3
    assert matched(index, keys) == 5


def test_bridge_through_real_wire_payload() -> None:
    """vLLM-shaped msgpack → decoder → ingestor → index, then a request lookup."""
    index, ingestor = setup()
    events = [
        {"type": "BlockStored", "block_hashes": [b"h1", b"h2"], "parent_block_hash": None,
         "token_ids": PROMPT[: 2 * BLOCK], "block_size": BLOCK, "lora_id": None, "medium": "GPU",
         "lora_name": None, "extra_keys": None},
        ["BlockStored", [b"h3"], b"h2", PROMPT[2 * BLOCK : 3 * BLOCK], BLOCK, None, None],
    ]  # fmt: skip
    ingestor.apply("a", decode_batch(0, msgpack.packb([1.0, events, 0])))
    assert matched(index, request_keys(PROMPT)) == 3


def test_lora_and_salt_roots_match_request_side() -> None:
    index, ingestor = setup()
    tokens = PROMPT[: 2 * BLOCK]
    ingestor.apply("a", batch(stored([1, 2], None, tokens, lora="adapter", salt="s1")))
    assert matched(index, request_keys(tokens, lora="adapter", salt="s1")) == 2
    assert matched(index, request_keys(tokens)) == 0
    assert matched(index, request_keys(tokens, lora="adapter")) == 0
    assert matched(index, request_keys(tokens, salt="s1")) == 0
    # The salt from the wire (extra_keys) reaches the same root.
    payload = msgpack.packb([0.0, [{"type": "BlockStored", "block_hashes": [9], "parent_block_hash": None,
                                    "token_ids": tokens[:BLOCK], "block_size": BLOCK, "lora_id": 1, "medium": "GPU",
                                    "lora_name": "adapter", "extra_keys": [("adapter", "s2")]}]])  # fmt: skip
    ingestor.apply("b", decode_batch(0, payload))
    assert matched(index, request_keys(tokens, lora="adapter", salt="s2"), B) == 1


def test_engines_serving_other_models_use_their_root() -> None:
    index = InMemoryIndex()
    ingestor = IndexIngestor(index, KVLayout(BLOCK), {"a": "model-x", "b": "model-y"}.get)
    tokens = PROMPT[:BLOCK]
    ingestor.apply("a", batch(stored([1], None, tokens)))
    ingestor.apply("b", batch(stored([1], None, tokens)))  # same engine hash, other engine
    assert lengths(index.lookup(request_keys(tokens, "model-x"))) == {"a": 1}
    assert lengths(index.lookup(request_keys(tokens, "model-y"))) == {"b": 1}


def test_removed_resolves_engine_hashes_and_evicts() -> None:
    index, ingestor = setup()
    ingestor.apply("a", batch(stored([101, 102, 103, 104], None, PROMPT[: 4 * BLOCK])))
    ingestor.apply("a", batch(ChunkRemoved((103, 104), TIER_GPU), seq=1))
    keys = request_keys(PROMPT)
    assert matched(index, keys) == 2
    assert index.num_chunks(A) == 2
    assert ingestor.stats.blocks_removed == 2
    assert ingestor.known_blocks(A) == 2
    # Unknown hashes are ignored, not counted.
    ingestor.apply("a", batch(ChunkRemoved((999,), TIER_GPU), seq=2))
    assert ingestor.stats.blocks_removed == 2
    assert matched(index, keys) == 2


def test_removed_is_per_engine() -> None:
    index, ingestor = setup()
    tokens = PROMPT[: 2 * BLOCK]
    ingestor.apply("a", batch(stored([1, 2], None, tokens)))
    ingestor.apply("b", batch(stored([1, 2], None, tokens)))
    ingestor.apply("a", batch(ChunkRemoved((2,), TIER_GPU)))
    keys = request_keys(tokens)
    assert lengths(index.lookup(keys)) == {"a": 1, "b": 2}


def test_block_in_two_tiers_stays_resolvable_until_both_remove_it() -> None:
    index, ingestor = setup()
    tokens = PROMPT[: 2 * BLOCK]
    keys = request_keys(tokens)
    ingestor.apply("a", batch(stored([1, 2], None, tokens, TIER_GPU), stored([1, 2], None, tokens, TIER_CPU)))
    assert index.lookup(keys)[A].by_tier == {TIER_GPU: 2, TIER_CPU: 2}
    ingestor.apply("a", batch(ChunkRemoved((1, 2), TIER_GPU)))
    assert index.lookup(keys)[A].by_tier == {TIER_CPU: 2}
    # A child stored after the GPU copy left still finds its parent (via the CPU copy).
    ingestor.apply("a", batch(stored([3], 2, PROMPT[2 * BLOCK : 3 * BLOCK], TIER_CPU)))
    assert matched(index, request_keys(PROMPT)) == 3
    ingestor.apply("a", batch(ChunkRemoved((1, 2, 3), TIER_CPU)))
    assert index.lookup(keys) == {}
    assert ingestor.known_blocks(A) == 0


def test_orphan_blocks_are_counted_not_indexed() -> None:
    index, ingestor = setup()
    ingestor.apply("a", batch(stored([5, 6], 4, PROMPT[BLOCK : 3 * BLOCK])))  # parent 4 never seen
    assert ingestor.stats.orphan_blocks == 2
    assert ingestor.stats.blocks_stored == 0
    assert len(index) == 0
    assert ingestor.known_blocks(A) == 0
    # Its children are orphans too.
    ingestor.apply("a", batch(stored([7], 6, PROMPT[3 * BLOCK : 4 * BLOCK])))
    assert ingestor.stats.orphan_blocks == 3
    assert len(index) == 0


def test_root_block_of_engine_with_unknown_model_is_orphan() -> None:
    index = InMemoryIndex()
    ingestor = IndexIngestor(index, KVLayout(BLOCK), lambda engine: None)
    ingestor.apply("a", batch(stored([1, 2], None, PROMPT[: 2 * BLOCK])))
    assert ingestor.stats.orphan_blocks == 2
    assert len(index) == 0


def test_block_size_mismatch_is_counted_not_indexed() -> None:
    index, ingestor = setup()
    tokens = PROMPT[: 2 * BLOCK]
    ingestor.apply("a", batch(stored([1], None, tokens, block_size=2 * BLOCK)))
    assert ingestor.stats.block_size_mismatches == 1
    assert ingestor.stats.blocks_stored == 0
    assert len(index) == 0
    assert ingestor.known_blocks(A) == 0


def test_all_blocks_cleared_forgets_engine() -> None:
    index, ingestor = setup()
    tokens = PROMPT[: 2 * BLOCK]
    ingestor.apply("a", batch(stored([1, 2], None, tokens)))
    ingestor.apply("b", batch(stored([1, 2], None, tokens)))
    ingestor.apply("a", batch(AllChunksCleared()))
    assert lengths(index.lookup(request_keys(tokens))) == {"b": 2}
    assert ingestor.known_blocks(A) == 0
    # The mapping is gone: a child of a cleared block is an orphan.
    ingestor.apply("a", batch(stored([3], 2, PROMPT[2 * BLOCK : 3 * BLOCK])))
    assert ingestor.stats.orphan_blocks == 1


def test_reset_clears_engine_and_notifies() -> None:
    resets: list[tuple[str, str]] = []
    index, ingestor = setup(resets)
    tokens = PROMPT[: 2 * BLOCK]
    ingestor.apply("a", batch(stored([1, 2], None, tokens)))
    ingestor.apply("b", batch(stored([1, 2], None, tokens)))
    ingestor.reset("a", "gap")
    assert resets == [("a", "gap")]
    assert ingestor.stats.resets == 1
    assert lengths(index.lookup(request_keys(tokens))) == {"b": 2}
    assert ingestor.known_blocks(A) == 0 and ingestor.known_blocks(B) == 2
    # Events after the reset are indexed again.
    ingestor.apply("a", batch(stored([1], None, tokens[:BLOCK])))
    assert lengths(index.lookup(request_keys(tokens))) == {"a": 1, "b": 2}


def test_events_in_one_batch_apply_in_order() -> None:
    index, ingestor = setup()
    tokens = PROMPT[: 2 * BLOCK]
    ingestor.apply("a", batch(stored([1, 2], None, tokens), AllChunksCleared(), stored([1], None, tokens[:BLOCK])))
    assert matched(index, request_keys(tokens)) == 1


def test_a_reset_drops_the_engines_entries_in_batches_and_spares_what_it_stores_again() -> None:
    """A restart, a cache clear or an unfillable gap: the engine's own keys are evicted in
    batches between other work (never a scan of the whole index), and a block the restarted
    engine stores again before its turn comes is kept."""
    import asyncio

    from gateway.kvindex.removal import EngineDrops

    async def scenario() -> tuple[int, int, int, list[str]]:
        index = InMemoryIndex()
        ingestor = IndexIngestor(index, KVLayout(BLOCK), MODELS.get, drops=EngineDrops(index, batch_keys=2))
        hashes = [f"h{i}" for i in range(6)]
        first = stored(hashes, None, PROMPT[: 6 * BLOCK])
        ingestor.apply("a", batch(first))
        ingestor.apply("b", batch(first))
        order: list[str] = []

        async def other_work() -> None:
            for _ in range(10):
                order.append("request")
                await asyncio.sleep(0)

        working = asyncio.create_task(other_work())
        ingestor.reset("a", "engine restarted")
        # Its first block again, before the drop reached it (a restarted engine prefilling).
        ingestor.apply("a", batch(stored(["n0"], None, PROMPT[:BLOCK]), seq=1))
        dropping = asyncio.create_task(ingestor.drops.wait(A))
        dropping.add_done_callback(lambda _: order.append("dropped"))
        await dropping
        await working
        keys = request_keys(PROMPT)
        return matched(index, keys), matched(index, keys, B), index.num_chunks(A), order

    held_by_a, held_by_b, chunks_of_a, order = asyncio.run(scenario())
    assert (held_by_a, chunks_of_a) == (1, 1)  # only the block stored again
    assert held_by_b == 6
    assert order.index("dropped") > 1  # three batches of 2, with requests served between


def test_stored_blocks_join_the_engines_working_set() -> None:
    """Every worker sees every engine's events: what one worker routed reaches the others'
    working sets (the capacity scorer's view) through the blocks the engine stored."""
    from gateway.kvindex.working_set import WorkingSetTracker

    working_sets = WorkingSetTracker()
    index = InMemoryIndex()
    ingestor = IndexIngestor(index, KVLayout(BLOCK), MODELS.get, on_stored=working_sets.touch)
    ingestor.apply("a", batch(stored([1, 2], None, list(range(2 * BLOCK)))))
    assert working_sets.size(EngineId("a")) == 2 and working_sets.size(EngineId("b")) == 0
    ingestor.apply("a", batch(stored([3], 2, list(range(BLOCK)), medium=TIER_CPU)))  # offloaded: not device memory
    assert working_sets.size(EngineId("a")) == 2
