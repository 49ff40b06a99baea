"""An engine drained with prefixes only it holds: a plain drain vs one that hands them to its
peer first (gateway.elastic), on two local CPU engines running vLLM's NixlConnector, one core
each.

    python -m bench.elastic_drain [--groups 8] [--prefix-words 700] [--rounds 4] [--concurrency 3] [--settle-s 0]

Phase 1: `--rounds` requests for each of `--groups` shared prefixes (a long system prompt plus
the request's own question, one output token, the groups interleaved), `--concurrency` at a
time, through a gateway with the kv_aware policy over both engines: it pins each prefix to one
engine and the prefixes spread over the two. Then engine A, the one holding most prefixes alone,
is drained (`POST /admin/engines/{id}/drain`). Phase 2 (`--settle-s` after the drain call
answered): as many requests again over the same prefixes (new questions), all served by B. Three runs, each with its own gateway and prefixes
no engine has seen (the engines run once for all three):

- *plain drain, no transfers*: `elastic.handoff_on_drain: false`, `kv_transfer.enabled: false`:
  B recomputes each of A's prefixes at its first request;
- *plain drain*: `handoff_on_drain: false`, per-request KV transfers on (as deployed): the
  kv_aware scorer may pull a prefix from the draining A when B's first request of it comes;
- *hand-off*: `handoff_on_drain: true`, transfers on: the drain pulls A's hot prefixes into B
  before answering.

Reported per run: the prefixes A held (alone), the drain call's hand-off (prefixes pulled,
tokens moved, its duration), and phase 2's prompt tokens, the tokens cached (the engine's
`usage.prompt_tokens_details.cached_tokens`), those recomputed (prompt - cached), the
per-request transfers the gateway ran, TTFT p50 / p90 (and of the first request of each of A's
prefixes), and each engine's CPU use in phase 2 and in the few seconds after it. Every phase-2
request's measurements also go to a JSON-lines file under .cache/bench-logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import LOG_DIR, ROOT, gateway_process, markdown_table, median, percentile, write_report
from bench.elastic_common import (
    ADMIN, MODEL, Sample, engine_entry, gateway_config, nixl_engine_specs, question, replay, words,
)  # fmt: skip

IDLE_S = 3.0
RUNS = (  # label, elastic.handoff_on_drain, kv_transfer.enabled
    ("plain drain, no transfers", False, False),
    ("plain drain", False, True),
    ("hand-off", True, True),
)


@dataclass(slots=True)
class Run:
    drained: str = ""
    alone: set[str] = field(default_factory=set)  # prefixes only the drained engine served in phase 1
    prefixes_shared: int = 0  # ... it served along with the other engine
    drain_s: float = 0.0
    hand_off: dict[str, Any] | None = None
    transfers: float = 0.0  # per-request KV transfers the gateway attempted in phase 2
    busy: dict[str, float] = field(default_factory=dict)  # engine -> CPU share over phase 2
    idle: dict[str, float] = field(default_factory=dict)  # ... over `IDLE_S` with no request, after it
    settle: dict[str, float] = field(default_factory=dict)  # ... between the drain and phase 2 (--settle-s)
    after: list[Sample] = field(default_factory=list)

    def recomputed(self, only_alone: bool = False) -> int:
        """Phase 2's prompt tokens not cached (of the prefixes the drained engine held alone)."""
        after = [s for s in self.after if not only_alone or prefix_of(s.prompt) in self.alone]
        return sum(s.prompt_tokens - s.cached_tokens for s in after)

    def first_ttfts(self) -> list[float]:
        """TTFT of phase 2's first request of each prefix the drained engine held alone."""
        first: dict[str, Sample] = {}
        for s in sorted(self.after, key=lambda s: s.sent_at):
            first.setdefault(prefix_of(s.prompt), s)
        return [s.ttft_s for prefix, s in first.items() if prefix in self.alone]


def phase(rng: random.Random, prefixes: list[str], rounds: int) -> list[str]:
    """`rounds` prompts per prefix, the prefixes interleaved (each group's first request early)."""
    return [prefix + question(rng) for _ in range(rounds) for prefix in prefixes]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


class CPUShare:
    """Each engine's CPU use (its process tree's, in cores) between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._started = (0.0, {name: 0.0 for name in pids})

    def start(self) -> None:
        self._started = (time.monotonic(), {name: cpu_seconds(pid) for name, pid in self._pids.items()})

    def stop(self) -> dict[str, float]:
        at, cpu = self._started
        wall = max(1e-9, time.monotonic() - at)
        return {name: (cpu_seconds(pid) - cpu[name]) / wall for name, pid in self._pids.items()}


def prefix_of(prompt: str) -> str:
    return prompt.rsplit(" question ", 1)[0]


def counter(url: str, name: str, **labels: str) -> float:
    """A counter of the gateway's /metrics, summed over the samples with `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text)
    return sum(s.value for f in families for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())  # fmt: skip


def held_on_gpu(url: str, prompt: str, engine: str) -> int:
    resp = httpx.post(f"{url}/debug/route", json={"model": MODEL, "prompt": prompt}, headers=ADMIN, timeout=60)
    resp.raise_for_status()
    return int(resp.json()["engines"].get(engine, {}).get("matched_chunks_by_tier", {}).get("GPU", 0))


async def run_once(
    url: str, prefixes: list[str], rng: random.Random, rounds: int, concurrency: int, cpu: CPUShare, settle_s: float
) -> Run:
    run = Run()
    before = await replay(url, phase(rng, prefixes, rounds), concurrency)
    served: dict[str, set[str]] = defaultdict(set)  # prefix -> engines
    for s in before:
        served[prefix_of(s.prompt)].add(s.engine)
    alone: dict[str, list[str]] = defaultdict(list)  # engine -> the prefixes only it served
    for prefix, engines in served.items():
        if len(engines) == 1:
            alone[next(iter(engines))].append(prefix)
    run.drained = max(sorted(alone), key=lambda e: len(alone[e]), default=before[0].engine)
    run.alone = set(alone[run.drained])
    run.prefixes_shared = sum(1 for engines in served.values() if run.drained in engines and len(engines) > 1)
    # The drain plans from the index: wait for the drained engine's own events (BlockStored).
    deadline = time.monotonic() + 30
    for prefix in alone[run.drained]:
        while held_on_gpu(url, prefix, run.drained) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        resp = await client.post(f"{url}/admin/engines/{run.drained}/drain", headers=ADMIN)
        resp.raise_for_status()
        run.drain_s = time.perf_counter() - started
    run.hand_off = resp.json().get("hand_off")
    if settle_s > 0:
        cpu.start()
        await asyncio.sleep(settle_s)
        run.settle = cpu.stop()
    transfers = counter(url, "gateway_kv_transfers_total", outcome="attempted")
    cpu.start()
    run.after = await replay(url, phase(rng, prefixes, rounds), concurrency)
    run.busy = cpu.stop()
    cpu.start()
    await asyncio.sleep(IDLE_S)
    run.idle = cpu.stop()
    run.transfers = counter(url, "gateway_kv_transfers_total", outcome="attempted") - transfers
    if any(s.engine == run.drained for s in run.after):
        print(f"    note: the drained {run.drained} served phase-2 requests", file=sys.stderr)
    return run


def report(runs: dict[str, Run], args: argparse.Namespace) -> str:
    rows = []
    for label, r in runs.items():
        after, hand_off = r.after, r.hand_off or {}
        engines = [r.drained] + sorted(e for e in r.busy if e != r.drained)
        ttfts = [s.ttft_s for s in after]
        rows.append([
            label, f"{len(r.alone)} (+{r.prefixes_shared})", hand_off.get("prefixes_pulled", "-"),
            hand_off.get("tokens_moved", "-"), f"{r.drain_s * 1000:.0f}", len(after),
            sum(s.prompt_tokens for s in after), sum(s.cached_tokens for s in after), r.recomputed(),
            r.recomputed(only_alone=True), f"{r.transfers:.0f}", f"{median(ttfts) * 1000:.0f}",
            f"{percentile(ttfts, 90) * 1000:.0f}", f"{median(r.first_ttfts()) * 1000:.0f}",
            " / ".join(f"{r.busy[e]:.2f}" for e in engines), " / ".join(f"{r.idle[e]:.2f}" for e in engines),
        ])  # fmt: skip
    headers = ["drain", "prefixes A held alone (+shared)", "prefixes handed off", "tokens moved", "drain call ms",
               "phase-2 requests", "prompt tokens", "cached", "recomputed", "recomputed, A's prefixes",
               "per-request transfers", "TTFT p50 ms", "TTFT p90 ms",
               "TTFT p50 ms, 1st request of A's prefixes", "engine CPU in phase 2, A / B (cores)",
               f"engine CPU idle {IDLE_S:.0f} s after, A / B (cores)"]  # fmt: skip
    text = markdown_table(headers, rows)
    hand = runs.get("hand-off")
    for label, plain in runs.items():
        if hand is None or plain is hand:
            continue
        per_prefix = plain.recomputed(True) / max(1, len(plain.alone)) - hand.recomputed(True) / max(1, len(hand.alone))
        p50 = median([s.ttft_s for s in plain.after]) / median([s.ttft_s for s in hand.after])
        p90 = percentile([s.ttft_s for s in plain.after], 90) / percentile([s.ttft_s for s in hand.after], 90)
        first = median(plain.first_ttfts()) / median(hand.first_ttfts())
        text += (
            f"\n\nHand-off vs {label}: recompute avoided {plain.recomputed() - hand.recomputed()} prompt tokens "
            f"({plain.recomputed()} recomputed vs {hand.recomputed()}; {per_prefix:.0f} per prefix A held alone); "
            f"phase-2 TTFT {label} / hand-off: p50 {p50:.2f}x, p90 {p90:.2f}x, first request of A's prefixes "
            f"{first:.2f}x."
        )
    text += (
        f"\n\nPer run: {args.rounds} requests for each of {args.groups} prefixes of {args.prefix_words} words, "
        f"{args.concurrency} at a time, one output token; then the engine holding most prefixes alone (A) is "
        f"drained and, {args.settle_s:g} s after the drain call answered, as many requests again (new "
        "questions) go to the other. Each run has its own gateway "
        "and prefixes no engine has seen. Recomputed = prompt tokens - the engine's cached tokens: even a hit "
        "recomputes the request's own question and the prefix's last partial block.\n"
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prefix-words", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=4, help="requests per prefix in each phase")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=0.0, help="pause between the drain and phase 2")
    args = parser.parse_args()

    from engine_adapter.launch.launcher import EngineFleet

    specs = nixl_engine_specs(2)
    runs: dict[str, Run] = {}
    print("starting 2 local CPU engines with NIXL (a minute or two)...", file=sys.stderr)
    with EngineFleet(specs, LOG_DIR) as fleet:
        cpu = CPUShare({e.spec.name: e.process.pid for e in fleet.engines if e.process is not None})
        for seed, (label, hand_off, transfers) in enumerate(RUNS, 1):
            config = gateway_config(specs, {"handoff_on_drain": hand_off})
            config["kv_transfer"]["enabled"] = transfers
            rng = random.Random(seed * 7919)
            prefixes = [words(rng, args.prefix_words) for _ in range(args.groups)]
            print(f"  {label}: {args.rounds * args.groups} requests, a drain, as many again...", file=sys.stderr)
            with gateway_process(config) as url:
                runs[label] = asyncio.run(run_once(url, prefixes, rng, args.rounds, args.concurrency, cpu, args.settle_s))
            r = runs[label]
            print(f"    drained {r.drained} ({len(r.alone)} prefixes alone), hand-off {r.hand_off}, "
                  f"phase 2 recomputed {r.recomputed()} tokens; engine CPU (cores) between the drain "
                  f"and phase 2 {r.settle}, in phase 2 {r.busy}, after {r.idle}", file=sys.stderr)  # fmt: skip
    text = report(runs, args)
    samples = LOG_DIR / f"elastic_drain-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    with samples.open("w") as out:
        for label, r in runs.items():
            for s in sorted(r.after, key=lambda s: s.sent_at):
                row = {"run": label, "ttft_s": round(s.ttft_s, 4), "engine": s.engine, "prompt_tokens": s.prompt_tokens,
                       "cached_tokens": s.cached_tokens, "prefix_on_drained": prefix_of(s.prompt) in r.alone}  # fmt: skip
                out.write(json.dumps(row) + "\n")
    text += f"\nEvery phase-2 request: {samples.relative_to(ROOT)}.\n"
    print(text)
    print(f"report: {write_report('elastic_drain', 'An engine drained: plain vs hand-off', text)}")


if __name__ == "__main__":
    main()
