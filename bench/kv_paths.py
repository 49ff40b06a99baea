"""The three ways a prefix reaches an engine, measured on the same two local CPU engines: each
runs vLLM's MultiConnector with NIXL (engine to engine) and LMCacheMPConnector (one shared
LMCache store), one core each.

    python -m bench.kv_paths [--lengths 1024,2048,4096,8192] [--repeats 3]

For each prefix length, with fresh token ids each time, the request (prefix + 32 new tokens, one
output token) goes to engine B, and the time from sending to the answer is taken:
  recompute   B never saw the prefix: it prefills all of it (and writes it to the store);
  store       A computed the prefix (so it is in the store); B loads it from there;
  pull        A computed the prefix; the NIXL pull flow (engine_adapter.transfer) moves it
              A -> B, then the request goes to B (transfer included in the time);
  local       B again, after its store load: its own prefix cache.
The table also shows the tokens B reports cached (fewest over the repeats) and the NIXL reads
B's metrics count, which prove which connector served each path.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time

import httpx

from bench.common import LOG_DIR, ROOT, free_port, markdown_table, median, write_report
from bench.transfer import MODEL, TAIL, Engines
from engine_adapter.launch.kv_store import KVStoreSpec
from engine_adapter.transfer.nixl import EngineAddress

NIXL_READS = re.compile(r"^vllm:nixl_xfer_time_seconds_count\S* ([0-9.e+]+)$", re.MULTILINE)


class PathEngines(Engines):
    async def cached(self, engine: EngineAddress, prompt: list[int]) -> tuple[float, int]:
        """Seconds until the one-token answer, and the prompt tokens the engine reports cached."""
        started = time.perf_counter()
        resp = await self.client.post(f"{engine.url}/v1/completions",
                                      json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0})  # fmt: skip
        resp.raise_for_status()
        return time.perf_counter() - started, int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    async def nixl_reads(self, engine: EngineAddress) -> int:
        text = (await self.client.get(f"{engine.url}/metrics")).text
        return int(sum(float(v) for v in NIXL_READS.findall(text)))


PATHS = ("recompute", "store", "pull", "local")


async def measure(engines: PathEngines, length: int, repeats: int) -> list[object]:
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    store_cached, pull_cached = [], []
    reads_before = await engines.nixl_reads(engines.b)
    for _ in range(repeats):
        times["recompute"].append((await engines.cached(engines.b, engines.fresh(length + TAIL)))[0])
        prefix = engines.fresh(length)
        await engines.complete(engines.a, prefix)
        elapsed, cached = await engines.cached(engines.b, prefix + engines.fresh(TAIL))
        times["store"].append(elapsed)
        store_cached.append(cached)
        times["local"].append((await engines.cached(engines.b, prefix + engines.fresh(TAIL)))[0])
        prefix = engines.fresh(length)
        await engines.complete(engines.a, prefix)
        started = time.perf_counter()
        await engines.nixl.transfer(engines.a, engines.b, MODEL, prefix, timeout_s=60, request_id=f"paths-{time.time_ns()}")
        pull_cached.append((await engines.cached(engines.b, prefix + engines.fresh(TAIL)))[1])
        times["pull"].append(time.perf_counter() - started)
    reads = await engines.nixl_reads(engines.b) - reads_before
    recompute = median(times["recompute"])

    def cell(path: str) -> str:
        value = median(times[path])
        return f"{value * 1000:.0f}" if path == "recompute" else f"{value * 1000:.0f} ({value / recompute:.2f}×)"

    return [length, *(cell(p) for p in PATHS), min(store_cached), min(pull_cached), reads]


async def run(a_url: str, b_url: str, lengths: list[int], repeats: int) -> list[list[object]]:
    async with httpx.AsyncClient(timeout=120) as client:
        engines = PathEngines(client, a_url, b_url)
        # Not counted: the first request of each engine, NIXL's handshake (once per pair) and a
        # first store load.
        warm = engines.fresh(512)
        await engines.complete(engines.a, warm)
        await engines.transfer_then_serve(warm, engines.fresh(TAIL))
        warm = engines.fresh(512)
        await engines.complete(engines.a, warm)
        await engines.complete(engines.b, warm)
        rows = []
        for length in lengths:
            print(f"  prefix {length} tokens x{repeats}...", file=sys.stderr)
            rows.append(await measure(engines, length, repeats))
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    from engine_adapter.launch.launcher import EngineFleet, EngineSpec
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    store = KVStoreSpec("paths", port=free_port(), http_port=free_port(), l1_size_gib=1.0)
    specs = [
        EngineSpec(name=f"bench-paths-{i}", model_dir=str(model_dir), served_model_name=MODEL, port=free_port(),
                   cpu_bind=str(i), kv_transfer_port=free_port(), kv_store_port=store.port,
                   max_model_len=max(lengths) + 2 * TAIL)  # fmt: skip
        for i in range(2)
    ]
    print("starting an LMCache server and 2 local CPU engines with NIXL + LMCache (about a minute)...", file=sys.stderr)
    with EngineFleet(specs, LOG_DIR / "kv-paths", kv_store=store):
        rows = asyncio.run(run(specs[0].url, specs[1].url, lengths, args.repeats))
    headers = ["prefix tokens", "recompute on B ms", "store load on B ms", "pull A->B + B ms", "B local hit ms",
               "cached after store load", "cached after pull", "NIXL reads into B"]  # fmt: skip
    text = markdown_table(headers, rows) + (
        f"\n\nMedians of {args.repeats} per cell (ms from sending to the answer; in brackets, against "
        f"recomputing). Each request is the prefix + {TAIL} new tokens, one output token, sent to B. Both "
        "engines run NIXL and LMCacheMPConnector in one vLLM MultiConnector (NIXL first), one CPU core each, "
        "attached to one LMCache server (1 GiB, engine-driven transfers). 'cached' = fewest prompt tokens B "
        "reported cached over the repeats; 'NIXL reads' = B's vllm:nixl_xfer_time_seconds count over the "
        "row (one per pull: the store paths moved nothing over NIXL).\n"
    )
    print(text)
    print(f"report: {write_report('kv-paths', 'KV paths: recompute vs store vs peer pull vs local hit', text)}")


if __name__ == "__main__":
    main()
