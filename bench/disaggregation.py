"""Prefill/decode disaggregation against unified serving, on the same two local CPU engines
running vLLM's NixlConnector, through the gateway.

    python -m bench.disaggregation [--prompt-tokens 2048] [--output-tokens 64] [--requests 8]
                                   [--concurrency 1,4]

Two gateways over the same engines (each pinned to its own core):
  unified        both engines `role: both`: each request is prefilled and decoded on one engine;
  disaggregated  engine 0 `role: prefill`, engine 1 `role: decode`: engine 0 prefills, engine 1
                 pulls the KV over NIXL and decodes.
Each run sends `--requests` streamed completions with fresh prompts (nothing cached) of about
`--prompt-tokens` tokens and `--output-tokens` output tokens (ignore_eos), `concurrency` at a time.
Time to first token (TTFT: request sent to the first token event) and inter-token latency (ITL:
the gaps between a stream's token events) are measured at the client. Prints a table and writes
a report under bench/reports/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import LOG_DIR, ROOT, free_port, gateway_process, markdown_table, percentile, write_report

MODEL = "tiny-llama"
BLOCK = 32
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]


def fresh_prompt(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of filler no other prompt starts like (a word is ~2 tokens here)."""
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(tokens // 2))


@dataclass
class Run:
    mode: str
    concurrency: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    tokens: int = 0
    engines: dict[str, int] = field(default_factory=dict)


async def one(client: httpx.AsyncClient, url: str, prompt: str, output_tokens: int, run: Run) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}  # fmt: skip
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        engine = resp.headers.get("x-gateway-engine", "?")
        if "x-gateway-prefill-engine" in resp.headers:
            engine = f"{resp.headers['x-gateway-prefill-engine']}->{engine}"
        run.engines[engine] = run.engines.get(engine, 0) + 1
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if any(choice.get("text") for choice in event.get("choices", [])):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("a stream without tokens")
    run.ttft.append(stamps[0] - started)
    run.itl.extend(b - a for a, b in zip(stamps, stamps[1:]))
    run.tokens += len(stamps)


async def measure(url: str, mode: str, concurrency: int, prompts: list[str], output_tokens: int) -> Run:
    run = Run(mode, concurrency)
    queue = list(prompts)
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker() -> None:
            while queue:
                await one(client, url, queue.pop(0), output_tokens, run)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - started
    return run


def gateway_config(engines: list[dict[str, Any]], model_dir: str) -> dict[str, Any]:
    return {
        "engines": engines,
        "models": [{"name": MODEL, "tokenizer": model_dir}],
        "kv_index": {"block_size": BLOCK},
        "health": {"interval_s": 5},
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(runs: list[Run], args: argparse.Namespace) -> str:
    rows = []
    for run in runs:
        rows.append([
            run.mode, run.concurrency, ms(percentile(run.ttft, 50)), ms(percentile(run.ttft, 90)),
            ms(percentile(run.itl, 50)), ms(percentile(run.itl, 90)), ms(percentile(run.itl, 99)),
            f"{run.tokens / run.wall_s:.1f}", ", ".join(f"{k} x{v}" for k, v in sorted(run.engines.items())),
        ])  # fmt: skip
    headers = ["mode", "concurrency", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms",
               "output tok/s", "engines (prefill->decode)"]  # fmt: skip
    return markdown_table(headers, rows) + (
        f"\n\n{args.requests} streamed completions per row, fresh prompts of about {args.prompt_tokens} tokens, "
        f"{args.output_tokens} output tokens each (ignore_eos), through the gateway; times at the client. "
        "Same two CPU engines (one core each, NixlConnector) for both modes; unified: both `role: both`, "
        "disaggregated: engine 0 `role: prefill`, engine 1 `role: decode`.\n"
    )


async def bench(urls: list[str], model_dir: str, args: argparse.Namespace) -> list[Run]:
    rng = random.Random(11)
    names = ["bench-pd-0", "bench-pd-1"]
    modes = {
        "unified": ["both", "both"],
        "disaggregated": ["prefill", "decode"],
    }
    runs = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for mode, roles in modes.items():
            engines = [{"name": n, "url": u, "kv_transfer": True, "role": r} for n, u, r in zip(names, urls, roles)]
            with gateway_process(gateway_config(engines, model_dir)) as url:
                # Warm-up (not counted): NIXL's handshake between the engines, the engines' first batches.
                await measure(url, mode, 1, [fresh_prompt(rng, args.prompt_tokens) for _ in range(2)], 4)
                print(f"  {mode}, concurrency {concurrency}...", file=sys.stderr)
                prompts = [fresh_prompt(rng, args.prompt_tokens) for _ in range(args.requests)]
                runs.append(await measure(url, mode, concurrency, prompts, args.output_tokens))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4")
    args = parser.parse_args()

    from engine_adapter.launch.launcher import EngineFleet, EngineSpec
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    specs = [
        EngineSpec(name=f"bench-pd-{i}", model_dir=str(model_dir), served_model_name=MODEL, port=free_port(),
                   cpu_bind=str(i), kv_transfer_port=free_port(), max_model_len=16384)  # fmt: skip
        for i in range(2)
    ]
    print("starting 2 local CPU engines with NIXL (about a minute)...", file=sys.stderr)
    with EngineFleet(specs, LOG_DIR):
        runs = asyncio.run(bench([s.url for s in specs], str(model_dir), args))
    text = report(runs, args)
    print(text)
    print(f"report: {write_report('disaggregation', 'Prefill/decode disaggregation vs unified serving', text)}")


if __name__ == "__main__":
    main()
