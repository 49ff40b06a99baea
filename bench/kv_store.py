"""A shared KV store (one LMCache server, two local CPU engines with vLLM's LMCacheMPConnector):
what a load from the store costs against recomputing, and how truthfully the gateway's index
knows what the store holds.

    python -m bench.kv_store [--mode engine_driven|lmcache_driven] [--lengths 1024,2048,4096]
                             [--repeats 3] [--prompts 24] [--store-gib 0.05]

Time (fresh token ids each time, one output token, sending to answer):
  recompute   engine A prefills the prompt cold (and writes it to the store);
  store       engine B, which never saw it, loads it from the store;
  local       engine B again: its own prefix cache.

Accuracy: `--prompts` prompts of 2k tokens go to engine A, more than the store's memory
(`--store-gib`) holds, so the store evicts the oldest. The index is fed with the engines' KV
events exactly as the gateway ingests them (gateway.kvindex.ingest, both engines attached to
one store). Then each prompt, with a short new tail, goes to engine B; before it is sent, the
index's store run for it is read. A row is right when that run, in whole store chunks,
equals the chunks B reports it loaded (`cached_tokens`, B holding none of it itself).
In `engine_driven` (the default, fast) mode only the writing engine announces a chunk and
nothing announces an eviction; in `lmcache_driven` every engine announces both.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import zmq

from bench.common import LOG_DIR, ROOT, free_port, markdown_table, median, write_report
from engine_adapter.events.decoder import decode_batch, decode_seq
from engine_adapter.events.model import EventBatch
from engine_adapter.launch.kv_store import CHUNK_SIZE_TOKENS, KVStoreSpec, connector_config
from engine_adapter.launch.launcher import EngineFleet, EngineSpec, local_specs
from engine_adapter.launch.tiny_model import ensure_tiny_model
from gateway.kvindex.base import TIER_STORAGE
from gateway.kvindex.ingest import IndexIngestor
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.stores import store_holder
from gateway.tokenization.chunking import chain_root, chunk_keys

MODEL = "tiny-llama"
BLOCK_SIZE = 32
STORE = "bench"
# In the lmcache_driven mode each engine maps a buffer of its own here, which a stopped engine
# leaves behind (1 GiB each, seen here).
SHM_DIR = Path("/dev/shm")


class EventTap:
    """Every engine's KV events, decoded on a thread, applied to an index on the caller's."""

    def __init__(self, specs: list[EngineSpec]) -> None:
        self._batches: queue.Queue[tuple[str, EventBatch]] = queue.Queue()
        self._stop = threading.Event()
        self.index = InMemoryIndex()
        self.ingestor = IndexIngestor(self.index, KVLayout(BLOCK_SIZE), lambda _: MODEL, store_of=lambda _: STORE)
        self._threads = [threading.Thread(target=self._follow, args=(s,), daemon=True) for s in specs]
        for thread in self._threads:
            thread.start()

    def _follow(self, spec: EngineSpec) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        sock.connect(str(spec.kv_events_endpoint))
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVTIMEO, 200)
        while not self._stop.is_set():
            try:
                _, seq, payload = sock.recv_multipart()
            except zmq.Again:
                continue
            self._batches.put((spec.name, decode_batch(decode_seq(seq), payload)))
        sock.close(linger=0)

    def store_run_tokens(self, token_ids: list[int]) -> int:
        while True:
            try:
                engine, batch = self._batches.get_nowait()
            except queue.Empty:
                break
            self.ingestor.apply(engine, batch)
        keys = chunk_keys(token_ids, BLOCK_SIZE, chain_root(MODEL))
        match = self.index.lookup(keys).get(store_holder(STORE))
        return 0 if match is None else match.by_tier.get(TIER_STORAGE, 0) * BLOCK_SIZE

    def stop(self) -> None:
        self._stop.set()


def complete(url: str, token_ids: list[int]) -> tuple[float, int]:
    """Seconds from sending to the answer, and the cached tokens the engine reports."""
    started = time.perf_counter()
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": token_ids, "max_tokens": 1,
                                                     "temperature": 0}, timeout=120)  # fmt: skip
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed, int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def timing_rows(a: str, b: str, lengths: list[int], repeats: int, rng: random.Random) -> list[list[object]]:
    rows: list[list[object]] = []
    for length in lengths:
        recompute, store, local, loaded = [], [], [], []
        for _ in range(repeats):
            prompt = [rng.randrange(100, 4000) for _ in range(length)]
            recompute.append(complete(a, prompt)[0])
            elapsed, cached = complete(b, prompt)
            store.append(elapsed)
            loaded.append(cached)
            local.append(complete(b, prompt)[0])
        rows.append([length, median(recompute) * 1000, median(store) * 1000, median(local) * 1000, min(loaded)])
    return rows


def accuracy_rows(tap: EventTap, a: str, b: str, num_prompts: int, rng: random.Random) -> tuple[list[list[object]], int]:
    prompts = [[rng.randrange(100, 4000) for _ in range(2048)] for _ in range(num_prompts)]
    for prompt in prompts:
        complete(a, prompt)
    complete(a, [rng.randrange(100, 4000) for _ in range(64)])  # A steps once more: its last events go out
    time.sleep(1.0)
    rows: list[list[object]] = []
    num_right = 0
    for number, prompt in enumerate(prompts):
        asked = prompt + [rng.randrange(100, 4000) for _ in range(40)]
        indexed = tap.store_run_tokens(asked) // CHUNK_SIZE_TOKENS
        _, cached = complete(b, asked)
        loaded = cached // CHUNK_SIZE_TOKENS
        num_right += indexed == loaded
        rows.append([number, indexed, loaded, "yes" if indexed == loaded else "no"])
    return rows, num_right


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["engine_driven", "lmcache_driven"], default="engine_driven")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--store-gib", type=float, default=0.05)
    args = parser.parse_args(argv)
    model_dir = str(ensure_tiny_model(ROOT / ".cache" / "tiny-llama"))
    slow = args.mode == "lmcache_driven"
    store = KVStoreSpec(STORE, port=free_port(), http_port=free_port(), l1_size_gib=args.store_gib,
                        kv_event_log_size=32768 if slow else 0)  # fmt: skip
    connector = json.dumps(connector_config("127.0.0.1", store.port, args.mode if slow else None))
    specs = local_specs(2, model_dir=model_dir, served_model_name=MODEL, base_port=free_port(), max_model_len=8192,
                        extra_args=["--kv-transfer-config", connector])  # fmt: skip
    specs = [replace(s, port=free_port(), kv_events_port=free_port()) for s in specs]
    fleet = EngineFleet(specs, LOG_DIR / "kv-store", kv_store=store)
    rng = random.Random(7)
    shm_before = set(SHM_DIR.glob("lmcache_kv_*"))
    fleet.start(timeout_s=400)
    tap = EventTap(specs)
    try:
        a, b = (s.url for s in specs)
        complete(a, [1, 2, 3])  # warm-up
        complete(b, [4, 5, 6])
        timing = timing_rows(a, b, [int(n) for n in args.lengths.split(",")], args.repeats, rng)
        accuracy, num_right = accuracy_rows(tap, a, b, args.prompts, rng)
    finally:
        tap.stop()
        fleet.stop()
        for leftover in set(SHM_DIR.glob("lmcache_kv_*")) - shm_before:
            leftover.unlink(missing_ok=True)
    body = (
        f"Mode `{args.mode}`, store {args.store_gib:g} GiB, medians of {args.repeats} (ms, sending to answer):\n\n"
        + markdown_table(["prompt tokens", "recompute", "from store", "local hit", "loaded tokens (fewest)"], timing)
        + f"\n\nIndex vs store ({num_right}/{len(accuracy)} right; store chunks of {CHUNK_SIZE_TOKENS} tokens):\n\n"
        + markdown_table(["prompt", "index says", "engine loaded", "right"], accuracy)
    )
    print(body)
    print(f"report: {write_report(f'kv-store-{args.mode}', 'Shared KV store', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
