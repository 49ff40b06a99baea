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
import random
import sys
import time
from typing import Any

import httpx

from bench.common import LOG_DIR, gateway_process, markdown_table, median, percentile, write_report
from bench.elastic_common import ADMIN, Sample, engine_entry, gateway_config, nixl_engine_specs, question, replay, words

FIRST_MINUTE_S = 60.0


def trace(seed: int, groups: int, prefix_words: int, requests: int) -> list[str]:
    rng = random.Random(seed)
    prefixes = [words(rng, prefix_words) for _ in range(groups)]
    # Skewed: the first groups are the hottest, as in real traffic.
    weights = [1.0 / (i + 1) for i in range(groups)]
    return [rng.choices(prefixes, weights)[0] + question(rng) for _ in range(requests)]


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

    from engine_adapter.launch.launcher import EngineFleet

    specs = nixl_engine_specs(2)

    results: dict[str, dict[str, Any]] = {}
    print("starting 2 local CPU engines with NIXL (a minute or two)...", file=sys.stderr)
    with EngineFleet(specs, LOG_DIR):
        for seed, (label, warm) in enumerate((("cold", False), ("warmed", True)), 1):
            config = gateway_config(specs[:1], {"warm_on_join": warm})
            prompts = trace(seed * 1000, args.groups, args.prefix_words, args.requests)
            print(f"  {label}: replaying {len(prompts)} requests, the second engine joining halfway...", file=sys.stderr)
            with gateway_process(config) as url:
                results[label] = asyncio.run(run_once(url, engine_entry(specs[1]), prompts, args.concurrency))
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
