"""Replay benchmark: the same workloads through each routing policy, on the same real engines.

    python -m bench.replay --trace trace.jsonl   # all workloads, all policies, 2 local CPU engines
    python -m bench.replay --workloads shared multi --policies round_robin,kv_aware
    python -m bench.replay --target http://other-router:8000 --target-name other

Starts 2 local CPU vLLM engines with the tiny model (KV cache capped so the capacity-pressure
workload means something), then for each policy starts a gateway in front of them and
replays each workload. Every run replays the same arrivals with fresh token content, so no
policy profits from another's cache. `--target URL` adds any OpenAI-compatible endpoint
(another router, one engine) to the comparison on the same workloads. Prints one table per
workload and writes to bench/reports/ a markdown report, a PNG plot and every request's
measurements (JSON lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (LOG_DIR, ROOT, free_port, gateway_process, markdown_table, median, percentile,
                          read_event_stream, write_report)
from bench.workloads import BenchRequest, Workload, mooncake_trace, multi_turn, oracle_hit_rate, shared_prefix

MODEL = "tiny-llama"
BLOCK_SIZE = 32
POLICIES = ("round_robin", "least_loaded", "session", "prefix", "kv_aware")


@dataclass
class Sample:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    predicted: int | None
    engine: str | None
    ok: bool = True
    first_use: bool = False  # the first request of its group or chat: nothing can be cached yet
    group: str = ""
    sent_at_s: float = 0.0  # since the start of the run


@dataclass
class RunResult:
    target: str
    workload: str
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    engine_requests: dict[str, float] = field(default_factory=dict)
    failures: int = 0

    def row(self, oracle: float) -> list[Any]:
        ok = [s for s in self.samples if s.ok]
        prompt = sum(s.prompt_tokens for s in ok)
        hit = sum(s.cached_tokens for s in ok) / prompt if prompt else 0.0
        ttfts = [s.ttft_s * 1000 for s in ok]
        repeat_ttfts = [s.ttft_s * 1000 for s in ok if not s.first_use]
        loads = list(self.engine_requests.values())
        balance = max(loads) / (sum(loads) / len(loads)) if loads and sum(loads) else float("nan")
        checked = [s for s in ok if s.predicted is not None]
        accurate = (sum(1 for s in checked if abs(s.cached_tokens - (s.predicted or 0)) <= BLOCK_SIZE)
                    / len(checked)) if checked else float("nan")  # fmt: skip
        return [
            self.target, f"{hit:.1%}", f"{oracle:.1%}", f"{hit / oracle:.0%}" if oracle else "-",
            sum(ttfts) / len(ttfts) if ttfts else float("nan"), median(ttfts), percentile(ttfts, 90),
            percentile(repeat_ttfts, 90),
            len(ok) / self.wall_s if self.wall_s else 0.0, balance,
            f"{accurate:.1%}" if checked else "n/a", self.failures,
        ]  # fmt: skip


HEADERS = ["policy", "hit rate (engine)", "oracle", "of oracle", "TTFT mean ms", "TTFT p50 ms",
           "TTFT p90 ms", "p90 repeats ms", "req/s", "max/mean load", "prediction ±1 block", "failed"]  # fmt: skip


async def send(client: httpx.AsyncClient, base_url: str, request: BenchRequest) -> Sample:
    body = {**request.body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    async with client.stream("POST", f"{base_url}{request.api_path}", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Sample(0, 0, 0, None, None, ok=False)
        ttft, usage = await read_event_stream(resp, start)
    predicted = resp.headers.get("x-gateway-predicted-cached-tokens")
    details = usage.get("prompt_tokens_details") or {}
    return Sample(
        ttft_s=ttft if ttft is not None else time.perf_counter() - start,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens") or 0),
        predicted=int(predicted) if predicted is not None else None,
        engine=resp.headers.get("x-gateway-engine"),
    )


async def replay(base_url: str, workload: Workload, label: str) -> RunResult:
    result = RunResult(label, workload.name)
    queue: asyncio.Queue[list[BenchRequest]] = asyncio.Queue()
    for session in workload.sessions:
        queue.put_nowait(session)
    total = workload.num_requests
    first_uses = workload.first_uses()
    started = time.perf_counter()
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while True:
            try:
                session = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for request in session:
                if request.at_s is not None:
                    await asyncio.sleep(max(0.0, started + request.at_s - time.perf_counter()))
                if request.think_s:
                    await asyncio.sleep(request.think_s)
                sent_at = time.perf_counter() - started
                try:
                    sample = await send(client, base_url, request)
                except httpx.HTTPError:
                    sample = Sample(0, 0, 0, None, None, ok=False)
                sample.first_use = id(request) in first_uses
                sample.group, sample.sent_at_s = request.group, sent_at
                result.samples.append(sample)
                result.failures += 0 if sample.ok else 1
                done += 1
                if done % max(1, total // 10) == 0:
                    print(f"    {label}: {done}/{total} requests", file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=workload.concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(workload.concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


def engine_request_counts(engine_urls: dict[str, str]) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for name, url in engine_urls.items():
        total = 0.0
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == "vllm:request_success_total":
                    total += sample.value
        counts[name] = total
    return counts


def build_workloads(names: list[str], seed: int, content_seed: int, scale: float = 1.0, uses_per_prefix: int = 24,
                    turns: int = 24, trace: Path | None = None) -> list[Workload]:  # fmt: skip
    """`seed` fixes each workload's shape (arrivals, order, lengths), `content_seed` its tokens;
    `trace`: the Mooncake-format file the "trace" workload replays (none: it is left out)."""
    n = lambda x: max(1, int(x * scale))  # noqa: E731
    workloads = []
    if "shared" in names:
        # 6 groups × 3,072 tokens: 576 blocks, all of them fit in one engine's 640.
        workloads.append(shared_prefix(MODEL, num_groups=n(6), prompts_per_group=uses_per_prefix, prefix_tokens=3072,
                                       question_tokens=96, max_tokens=8, seed=seed, content_seed=content_seed,
                                       rate_per_s=2.0))  # fmt: skip
    if "capacity" in names:
        # 8 groups × 3,072 tokens: 768 blocks, more than one engine's 640, less than two.
        workloads.append(shared_prefix(MODEL, num_groups=8, prompts_per_group=uses_per_prefix, prefix_tokens=3072,
                                       question_tokens=96, max_tokens=8, seed=seed + 1,
                                       content_seed=content_seed + 1, rate_per_s=2.0))  # fmt: skip
        workloads[-1].name = "capacity pressure " + workloads[-1].name
    if "multi" in names:
        # Agent-loop shape: a long system prompt, many short turns (~1.6k tokens growing by ~175
        # a turn). About 7 chats are in progress at a time, 18k tokens of history on average and
        # up to ~30k: often more than one engine's 20k (640 blocks), three quarters of two
        # engines' at the peak. Round robin puts every chat on both engines and evicts
        # histories still in use; a prefix-aware policy can keep each where it is.
        workloads.append(multi_turn(MODEL, num_sessions=n(16), turns=turns, system_words=700, user_words=40,
                                    reply_words=30, max_tokens=8, seed=seed + 2, content_seed=content_seed + 2,
                                    session_rate_per_s=0.13, think_s=2.0))  # fmt: skip
    if "trace" in names and trace is not None:
        workloads.append(mooncake_trace(MODEL, trace, max_requests=n(150), max_blocks=6, block_tokens=512,
                                        time_scale=1.0, max_tokens=16, seed=content_seed + 3))  # fmt: skip
    return workloads


def chat_prompt_ids(workload: Workload) -> list[list[int]]:
    from gateway.tokenization.tokenizer import HFPromptTokenizer

    tokenizer = HFPromptTokenizer(ROOT / ".cache" / "tiny-llama")
    prompts = []
    for session in workload.sessions:
        for request in session:
            ids = request.prompt_ids or tokenizer.token_ids_sync(request.api_path, request.body) or []
            prompts.append(ids)
    tokenizer.close()
    return prompts


def plot(results: dict[str, list[RunResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (workload, runs) in zip(axes[0], results.items()):
        labels = [r.target for r in runs]
        p50 = [median([s.ttft_s * 1000 for s in r.samples if s.ok]) for r in runs]
        p90 = [percentile([s.ttft_s * 1000 for s in r.samples if s.ok], 90) for r in runs]
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="TTFT p50")
        ax.bar([x + 0.2 for x in xs], p90, width=0.4, label="TTFT p90")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right")
        ax.set_ylabel("ms")
        ax.set_title(workload, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--workloads", nargs="+", default=["shared", "capacity", "multi", "trace"],
                        choices=["shared", "capacity", "multi", "trace"])  # fmt: skip
    parser.add_argument("--trace", type=Path, help="a Mooncake-format trace (JSON lines: timestamp, input_length, "
                        "output_length, hash_ids) for the 'trace' workload; without it that workload is left out")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of requests")
    parser.add_argument("--kv-blocks", type=int, default=640, help="KV-cache blocks per engine")
    parser.add_argument("--target", action="append", default=[], help="extra OpenAI-compatible URL to compare")
    parser.add_argument("--target-name", action="append", default=[])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--uses-per-prefix", type=int, default=24,
                        help="requests per group in the shared-prefix workload (its first use always misses)")
    parser.add_argument("--turns", type=int, default=24, help="turns per chat in the multi-turn workload")
    parser.add_argument("--engine-args", default="", help="extra vLLM arguments, e.g. '--max-num-batched-tokens 512'")
    args = parser.parse_args()
    if "trace" in args.workloads and args.trace is None:
        print("no --trace file given: the trace workload is left out", file=sys.stderr)

    from engine_adapter.launch.launcher import EngineFleet, local_specs
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    specs = local_specs(2, model_dir=str(model_dir), served_model_name=MODEL, base_port=free_port(),
                        kv_events_base_port=free_port(), max_model_len=8192,
                        num_gpu_blocks_override=args.kv_blocks, extra_args=args.engine_args.split())  # fmt: skip
    print("starting 2 local CPU engines (about a minute)...", file=sys.stderr, flush=True)
    policies = [p for p in args.policies.split(",") if p]
    targets = [(name, url) for name, url in zip(args.target_name + [f"target-{i}" for i in range(len(args.target))],
                                                 args.target)]  # fmt: skip
    results: dict[str, list[RunResult]] = {}
    oracles: dict[str, float] = {}
    with EngineFleet(specs, LOG_DIR) as fleet:
        engine_urls = {e.spec.name: e.spec.url for e in fleet.engines}
        engines = [{"name": e.spec.name, "url": e.spec.url, "kv_events_endpoint": e.spec.kv_events_endpoint}
                   for e in fleet.engines]  # fmt: skip
        for run_no, label in enumerate(policies + [t[0] for t in targets]):
            # The same arrivals for every run, fresh token content: nobody inherits another's cache.
            workloads = build_workloads(args.workloads, args.seed, args.seed + 100 * (run_no + 1), args.scale,
                                        args.uses_per_prefix, args.turns, args.trace)  # fmt: skip
            for workload in workloads:
                key = workload.name.split(" (")[0]
                if key not in oracles:
                    oracles[key] = oracle_hit_rate(chat_prompt_ids(workload), BLOCK_SIZE, 2 * args.kv_blocks)
                print(f"  [{label}] {workload.name}: {workload.num_requests} requests", file=sys.stderr, flush=True)
                before = engine_request_counts(engine_urls)
                if label in policies:
                    config = {"engines": engines, "models": [{"name": MODEL, "tokenizer": str(model_dir)}],
                              "routing": {"policy": label}, "kv_index": {"block_size": BLOCK_SIZE}}  # fmt: skip
                    with gateway_process(config) as url:
                        run = asyncio.run(replay(url, workload, label))
                else:
                    run = asyncio.run(replay(dict(targets)[label], workload, label))
                after = engine_request_counts(engine_urls)
                run.engine_requests = {k: after[k] - before[k] for k in after}
                results.setdefault(key, []).append(run)
    sections = []
    for key, runs in results.items():
        table = markdown_table(HEADERS, [r.row(oracles[key]) for r in runs])
        sections.append(f"## {key}\n\n{table}")
        print(f"\n{key}\n{table}")
    REPORT_NOTE = (
        "Hit rate: engine-reported cached prompt tokens / prompt tokens. Oracle: one pooled LRU "
        f"cache of the fleet's capacity ({2 * args.kv_blocks} blocks of {BLOCK_SIZE}), requests in order. "
        "Load: requests per engine (engine metrics), max/mean. Prediction: share of requests whose "
        "x-gateway-predicted-cached-tokens is within one block of the engine's cached_tokens. "
        "p90 repeats: TTFT p90 without the first request of each group or chat (a compulsory miss "
        "whatever the policy)."
    )
    report = write_report("replay", "Replay benchmark", "\n\n".join(sections) + "\n\n" + REPORT_NOTE)
    plot_path = report.with_suffix(".png")
    plot(results, plot_path)
    samples_path = report.with_suffix(".samples.jsonl")
    with samples_path.open("w") as handle:
        for runs in results.values():
            for run in runs:
                for sample in run.samples:
                    handle.write(json.dumps({"workload": run.workload, "target": run.target, **asdict(sample)}) + "\n")
    print(f"\nreport: {report}\nplot: {plot_path}\nper-request samples: {samples_path}")


if __name__ == "__main__":
    main()
