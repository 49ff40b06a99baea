"""An engine joining halfway through a trace replay, cold vs warmed (gateway.elastic), on two
local CPU engines running vLLM's NixlConnector, one core each.

    python -m bench.elastic_join [--groups 6] [--prefix-words 700] [--requests 48] [--concurrency 3]

The trace: `--requests` requests, each one of `--groups` shared prefixes (a long system prompt)
plus its own question, one output token, sent `--concurrency` at a time through a gateway with
the kv_aware policy over one engine. Halfway, the second engine joins through the admin API
(`POST /admin/engines`). Two runs, each with its own gateway and prefixes the engines have never
seen: *cold* (`elastic.warm_on_join: false`: the engine enters rotation at once; per-request KV
transfers still apply) and *warmed* (the hot prefixes are pulled into it before it enters
rotation). Reported: TTFT and cached tokens of the requests the new engine served in its first
minute, the join's own duration, and the whole second half's TTFT.

Two engines, not three, because the machine this was written on has two cores: a NIXL pull
between two engines pinned to one core did not finish (tests/integration/test_elastic.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import LOG_DIR, ROOT, free_port, gateway_process, markdown_table, median, percentile, write_report

MODEL = "tiny-llama"
BLOCK = 32
FIRST_MINUTE_S = 60.0
ADMIN = {"authorization": "Bearer bench-admin"}


@dataclass(frozen=True, slots=True)
class Sample:
    sent_at: float
    ttft_s: float
    engine: str
    prompt_tokens: int
    cached_tokens: int


def words(rng: random.Random, n: int) -> str:
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n))


def trace(seed: int, groups: int, prefix_words: int, requests: int) -> list[str]:
    rng = random.Random(seed)
    prefixes = [words(rng, prefix_words) for _ in range(groups)]
    # Skewed: the first groups are the hottest, as in real traffic.
    weights = [1.0 / (i + 1) for i in range(groups)]
    return [rng.choices(prefixes, weights)[0] + " question " + words(rng, 12) for _ in range(requests)]


async def send(client: httpx.AsyncClient, url: str, prompt: str) -> Sample:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft: float | None = None
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            usage = event.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Sample(start, ttft if ttft is not None else time.perf_counter() - start, resp.headers.get("x-gateway-engine", ""),
                  int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0))  # fmt: skip


async def replay(url: str, prompts: list[str], concurrency: int) -> list[Sample]:
    queue = list(reversed(prompts))
    samples: list[Sample] = []
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker() -> None:
            while queue:
                samples.append(await send(client, url, queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def run_once(url: str, joining: dict[str, Any], prompts: list[str], concurrency: int) -> dict[str, Any]:
    half = len(prompts) // 2
    await replay(url, prompts[:half], concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        resp = await client.post(f"{url}/admin/engines", json=joining, headers=ADMIN)
        resp.raise_for_status()
        joined_at = time.perf_counter()
    after = await replay(url, prompts[half:], concurrency)
    new = [s for s in after if s.engine == joining["name"] and s.sent_at - joined_at <= FIRST_MINUTE_S]
    return {"join_s": joined_at - started, "warm_up": resp.json().get("warm_up"), "new": new, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--prefix-words", type=int, default=700)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=3)
    args = parser.parse_args()

    from engine_adapter.launch.launcher import EngineFleet, EngineSpec
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    specs = [
        EngineSpec(name=f"bench-elastic-{i}", model_dir=str(model_dir), served_model_name=MODEL, port=free_port(),
                   kv_events_port=free_port(), cpu_bind=str(i % 2), kv_transfer_port=free_port(), max_model_len=16384)  # fmt: skip
        for i in range(2)
    ]

    def entry(i: int) -> dict[str, Any]:
        s = specs[i]
        return {"name": s.name, "url": s.url, "kv_events_endpoint": s.kv_events_endpoint, "kv_transfer": True}

    results: dict[str, dict[str, Any]] = {}
    print("starting 2 local CPU engines with NIXL (a minute or two)...", file=sys.stderr)
    with EngineFleet(specs, LOG_DIR):
        for seed, (label, warm) in enumerate((("cold", False), ("warmed", True)), 1):
            config = {
                "engines": [entry(0)], "routing": {"policy": "kv_aware"}, "kv_index": {"block_size": BLOCK},
                "kv_transfer": {"min_prefix_tokens": 256}, "elastic": {"warm_on_join": warm, "max_s": 120},
                "server": {"admin_token": "bench-admin"},
            }  # fmt: skip
            prompts = trace(seed * 1000, args.groups, args.prefix_words, args.requests)
            print(f"  {label}: replaying {len(prompts)} requests, the second engine joining halfway...", file=sys.stderr)
            with gateway_process(config) as url:
                results[label] = asyncio.run(run_once(url, entry(1), prompts, args.concurrency))
    rows = []
    for label, r in results.items():
        new: list[Sample] = r["new"]
        after: list[Sample] = r["after"]
        pulled = (r["warm_up"] or {}).get("prefixes_pulled", 0)
        rows.append([
            label, f"{r['join_s'] * 1000:.0f}", pulled, len(new),
            f"{median([s.ttft_s for s in new]) * 1000:.0f}", f"{percentile([s.ttft_s for s in new], 90) * 1000:.0f}",
            f"{sum(s.cached_tokens for s in new) / max(1, sum(s.prompt_tokens for s in new)):.0%}",
            f"{median([s.ttft_s for s in after]) * 1000:.0f}",
        ])  # fmt: skip
    headers = ["join", "join took ms", "prefixes warmed", "new engine's requests (1st min)", "their TTFT p50 ms",
               "their TTFT p90 ms", "their prompt tokens cached", "2nd half TTFT p50 ms (all engines)"]  # fmt: skip
    text = markdown_table(headers, rows)
    text += (
        f"\n\n{args.requests} requests over {args.groups} prefixes of {args.prefix_words} words (skewed 1/rank), "
        f"{args.concurrency} at a time, one output token; the second engine joins after request {args.requests // 2}. "
        "Each run has its own gateway and prefixes no engine has seen.\n"
    )
    print(text)
    print(f"report: {write_report('elastic_join', 'An engine joining halfway: cold vs warmed', text)}")


if __name__ == "__main__":
    main()
