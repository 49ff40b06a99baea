"""Micro-benchmarks of the chunk index (gateway/kvindex/memory.py): event ingest, lookup,
memory per (block, engine) entry, while filling and at capacity. Pure Python in one process,
no engines.

    python -m bench.index [--quick]

Targets (issue: "the gateway must never be the bottleneck"): ≥ 500k blocks/s ingest; ≤ 0.5 ms
to look up a 32k-token prompt (block 16: 2,048 keys) on 256 engines that all hold its prefix;
≤ 120 bytes per (block, engine) at 5M entries.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from bench.common import markdown_table, write_report
from gateway.kvindex.base import TIER_GPU
from gateway.kvindex.memory import InMemoryIndex
from gateway.types import EngineId, RequestChunkKey


def median_of(runs: int, measure: Callable[[], float]) -> float:
    """The median of `runs` measurements: on a shared machine one run can fall on a slow
    moment (the event ingest measured 464k blocks/s once, 730-750k in the runs around it)."""
    return statistics.median(measure() for _ in range(runs))


def keys(start: int, count: int) -> list[RequestChunkKey]:
    rng = random.Random(start)
    return [RequestChunkKey(rng.getrandbits(64)) for _ in range(count)]


def ingest_rate(num_blocks: int, num_engines: int, capacity_chunks: int | None = None) -> float:
    """Blocks/s through `add`, in batches of 16 as vLLM's BlockStored events carry them; with a
    capacity below `num_blocks`, the index drops a key for each new one once full."""
    index = InMemoryIndex(capacity_chunks=capacity_chunks or 10 * num_blocks)
    batches = [keys(i, 16) for i in range(num_blocks // 16)]
    engines = [EngineId(f"e{i}") for i in range(num_engines)]
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        index.add(engines[i % num_engines], batch, TIER_GPU)
    return len(batches) * 16 / (time.perf_counter() - start)


def event_ingest_rate(num_blocks: int, num_engines: int) -> float:
    """Blocks/s from decoded BlockStored events into the index, as the gateway runs it
    (gateway.kvindex.ingest: gateway keys from tokens and parent, engine-hash mapping)."""
    from engine_adapter.events.model import ChunkStored, EngineBlockHash, EventBatch
    from gateway.kvindex.ingest import IndexIngestor
    from gateway.kvindex.layout import KVLayout

    block = 16
    index = InMemoryIndex(capacity_chunks=10 * num_blocks)
    ingestor = IndexIngestor(index, KVLayout(block), lambda engine: "model")
    rng = random.Random(5)
    batches = []
    for b in range(num_blocks // 16):
        hashes = tuple(EngineBlockHash(rng.getrandbits(63)) for _ in range(16))
        tokens = tuple(rng.randrange(32000) for _ in range(16 * block))
        batches.append((f"e{b % num_engines}", EventBatch(b, 0.0, (ChunkStored(hashes, None, tokens, block, TIER_GPU),))))
    start = time.perf_counter()
    for engine, batch in batches:
        ingestor.apply(engine, batch)
    return len(batches) * 16 / (time.perf_counter() - start)


def drop_us_per_key(num_keys: int, num_engines: int) -> float:
    """Microseconds per key to drop one engine's keys from an index of `num_keys` keys spread
    over `num_engines` (gateway.kvindex.removal, as a reset or a reload's removal runs it: every
    tier of each key the engine's events stored, 1,024 keys a step of the event loop)."""
    import asyncio

    from gateway.kvindex.removal import drop_engine

    index = InMemoryIndex(capacity_chunks=num_keys)
    engines = [EngineId(f"e{i}") for i in range(num_engines)]
    mine: list[RequestChunkKey] = []
    for b in range(num_keys // 16):
        batch = keys(b, 16)
        index.add(engines[b % num_engines], batch, TIER_GPU)
        if b % num_engines == 0:
            mine += batch
    start = time.perf_counter()
    asyncio.run(drop_engine(index, engines[0], mine))  # in batches, as the gateway does
    elapsed = time.perf_counter() - start
    assert index.num_chunks(engines[0]) == 0
    return elapsed / len(mine) * 1e6


def lookup_ms(num_keys: int, num_engines: int, repeats: int, after_closing: bool = False) -> float:
    """With `after_closing`, `num_keys` other keys come in before each lookup: enough, at this
    capacity, to close the index's young generation (gateway/kvindex/generations.py) with the
    prompt in it, so that each lookup finds the prompt in a closed generation."""
    index = InMemoryIndex(capacity_chunks=(8 if after_closing else 10) * num_keys)
    prompt = keys(1, num_keys)
    for e in range(num_engines):
        # Every engine holds a prefix of the prompt, of its own length: the runs end at
        # different places, so the lookup has to tell them apart.
        index.add(EngineId(f"e{e}"), prompt[: num_keys - e], TIER_GPU)
    samples = []
    for repeat in range(repeats):
        if after_closing:
            others = keys(1000 + repeat, num_keys)
            for i in range(0, num_keys, 16):
                index.add(EngineId("e0"), others[i : i + 16], TIER_GPU)
        start = time.perf_counter()
        matches = index.lookup(prompt)
        samples.append((time.perf_counter() - start) * 1000)
    assert len(matches) == num_engines and matches[EngineId("e0")].num_chunks == num_keys
    return statistics.median(samples)


def next_turn_ms(prompt_tokens: int, num_sessions: int = 64, num_turns: int = 6) -> float:
    """Median milliseconds of the index work one routed request does, as the prefix service runs
    it for a conversation's next turn on engines without KV events (gateway.kvindex.service):
    chunk keys (block 32, from the conversation's previous turn's where they match, as
    `RecentChains` gives them), lookup, each of 2 candidates' missing working-set chunks, the
    approximate entries written again (TTL), the working set touched. `num_sessions`
    conversations of `prompt_tokens` tokens, each turn 120 tokens longer; first turns not
    counted."""
    from array import array

    from gateway.kvindex.base import TIER_APPROXIMATE
    from gateway.kvindex.working_set import WorkingSetTracker
    from gateway.tokenization.chunking import RecentChains, chain_root

    rng = random.Random(1)
    chains = RecentChains()
    index, working_sets = InMemoryIndex(capacity_chunks=1_000_000), WorkingSetTracker()
    engines = [EngineId("a"), EngineId("b")]
    sessions = [array("I", [rng.randrange(32000) for _ in range(prompt_tokens)]) for _ in range(num_sessions)]
    samples = []
    for turn in range(num_turns):
        for i, tokens in enumerate(sessions):
            tokens.extend(rng.randrange(32000) for _ in range(120))
            engine = engines[i % 2]
            start = time.perf_counter()
            prompt = chains.chunk_keys(tokens, 32, chain_root("model"))
            index.lookup(prompt)
            for candidate in engines:
                working_sets.num_missing(candidate, prompt)
            index.add(engine, prompt, TIER_APPROXIMATE, ttl_s=120)
            working_sets.touch_prompt(engine, prompt)
            if turn:
                samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def bytes_per_entry(num_keys: int, engines_per_key: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = InMemoryIndex(capacity_chunks=10 * num_keys)
    all_keys = keys(7, num_keys)
    for e in range(engines_per_key):
        for i in range(0, num_keys, 16):
            index.add(EngineId(f"e{e}"), all_keys[i : i + 16], TIER_GPU)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # The keys themselves arrive with the events (the index keeps references to them).
    return used / (num_keys * engines_per_key)


def bytes_per_entry_at_capacity(capacity: int, turnovers: int) -> float:
    """The most the index holds per key (1 engine) while new keys keep arriving once it is
    full, over `turnovers` × capacity of them: the steady state, with drops. The index owns the
    keys here (the events that brought them are gone)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = InMemoryIndex(capacity_chunks=capacity)
    engine = EngineId("e0")
    rng = random.Random(11)
    most = 0
    for i in range(0, capacity * (1 + turnovers), 16):
        index.add(engine, [RequestChunkKey(rng.getrandbits(64)) for _ in range(16)], TIER_GPU)
        if i >= capacity:
            most = max(most, tracemalloc.get_traced_memory()[0] - before)
    tracemalloc.stop()
    return most / capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    runs = 3 if args.quick else 5
    rows = [
        [f"index.add, 8 engines (median of {runs})",
         f"{median_of(runs, lambda: ingest_rate(1_000_000 // scale, 8)):,.0f} blocks/s", "≥ 500,000 blocks/s"],
        [f"index.add, 256 engines (median of {runs})",
         f"{median_of(runs, lambda: ingest_rate(1_000_000 // scale, 256)):,.0f} blocks/s", "≥ 500,000 blocks/s"],
        [f"index.add at capacity (250k; a key dropped per new one), 8 engines (median of {runs})",
         f"{median_of(runs, lambda: ingest_rate(1_000_000 // scale, 8, 250_000 // scale)):,.0f} blocks/s",
         "≥ 500,000 blocks/s"],
        [f"event ingest (keys from tokens, block 16), 8 engines (median of {runs})",
         f"{median_of(runs, lambda: event_ingest_rate(200_000 // scale, 8)):,.0f} blocks/s", "≥ 500,000 blocks/s"],
        ["drop an engine's keys (1 of 8 engines, 2M keys)", f"{drop_us_per_key(2_000_000 // scale, 8):.2f} µs/key", ""],
        ["lookup 32k tokens (2,048 keys), 8 engines", f"{lookup_ms(2048, 8, 50):.3f} ms", ""],
        ["lookup 32k tokens (2,048 keys), 256 engines", f"{lookup_ms(2048, 256, 50):.3f} ms", "≤ 0.5 ms"],
        ["the same, first after the prompt's generation closed (2,048 other keys came in)",
         f"{lookup_ms(2048, 256, 50, after_closing=True):.3f} ms", ""],
        ["index work of a routed request, a conversation's next turn, 2k tokens",
         f"{next_turn_ms(2048):.3f} ms", ""],
        ["the same, 16k tokens", f"{next_turn_ms(16384):.3f} ms", ""],
        ["memory, 5M keys × 1 engine", f"{bytes_per_entry(5_000_000 // scale, 1):.0f} B/entry", "≤ 120 B"],
        ["memory, 20k keys × 256 engines (5M entries)", f"{bytes_per_entry(20_000 // scale, 256):.1f} B/entry",
         "≤ 120 B"],
        ["memory at capacity, new keys arriving (5M keys × 1 engine, most over 2 turnovers)",
         f"{bytes_per_entry_at_capacity(5_000_000 // scale, 2):.0f} B/entry", "≤ 120 B"],
    ]  # fmt: skip
    table = markdown_table(["measure", "value", "target"], rows)
    print(table)
    print(f"\nreport: {write_report('index', 'Chunk index micro-benchmarks', table)}")


if __name__ == "__main__":
    main()
