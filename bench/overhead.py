"""Gateway overhead: the same requests sent to one engine directly and through the gateway,
interleaved so both see the same machine noise.

    python -m bench.overhead [--requests 200] [--engine-url http://host:port --model NAME]

Without --engine-url it starts one local CPU engine with the tiny model (about a minute).
Measures, per path: full latency of a short non-streamed completion, and time to first
byte of a streamed one. Prints median and p99 of each and the difference; writes a report.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import httpx

from bench.common import LOG_DIR, ROOT, free_port, gateway_process, markdown_table, median, percentile, write_report


@contextlib.contextmanager
def local_engine() -> Iterator[tuple[str, str, str]]:
    from engine_adapter.launch.launcher import EngineFleet, EngineSpec
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    spec = EngineSpec(name="bench-0", model_dir=str(model_dir), served_model_name="tiny-llama", port=free_port())
    print("starting one local CPU engine (about a minute)...", file=sys.stderr)
    with EngineFleet([spec], LOG_DIR):
        yield spec.url, "tiny-llama", str(model_dir)


def timed_request(client: httpx.Client, url: str, body: dict[str, object]) -> tuple[float, float]:
    """Returns (time to first body byte, total time) in milliseconds."""
    start = time.perf_counter()
    first = None
    with client.stream("POST", url, json=body) as resp:
        for _ in resp.iter_raw():
            if first is None:
                first = time.perf_counter()
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}")
    end = time.perf_counter()
    return ((first or end) - start) * 1000, (end - start) * 1000


def run(engine_url: str, model: str, num_requests: int, tokenizer: str) -> str:
    # The default prefix-aware path: tokenize, hash, look up, predict, check usage.
    gateway_config = {"engines": [{"name": "engine", "url": engine_url}], "routing": {"policy": "kv_aware"},
                      "models": [{"name": model, "tokenizer": tokenizer}]}  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {
        path: {"total": [], "ttfb": []} for path in ("direct", "gateway")
    }
    with gateway_process(gateway_config) as gateway_url, httpx.Client(timeout=60) as client:
        targets = {"direct": engine_url, "gateway": gateway_url}
        plain = {"model": model, "prompt": "Hello there, how are you", "max_tokens": 1}
        streamed = {**plain, "max_tokens": 8, "stream": True}
        for _ in range(10):  # warm both paths (connections, engine caches)
            for base in targets.values():
                timed_request(client, f"{base}/v1/completions", plain)
        for i in range(num_requests):
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            for path in order:
                _, total = timed_request(client, f"{targets[path]}/v1/completions", plain)
                ttfb, _ = timed_request(client, f"{targets[path]}/v1/completions", streamed)
                samples[path]["total"].append(total)
                samples[path]["ttfb"].append(ttfb)
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{num_requests} request pairs", file=sys.stderr)
    rows = []
    for metric, label in (("total", "non-streamed latency"), ("ttfb", "streamed time to first byte")):
        d, g = samples["direct"][metric], samples["gateway"][metric]
        rows.append([label, "median", median(d), median(g), median(g) - median(d)])
        rows.append([label, "p99", percentile(d, 99), percentile(g, 99), percentile(g, 99) - percentile(d, 99)])
    table = markdown_table(["measure", "stat", "direct ms", "via gateway ms", "added ms"], rows)
    return table + f"\n\n{num_requests} interleaved pairs per measure, one engine ({engine_url}), model {model}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--engine-url")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--tokenizer", default="engine", help="tokenizer dir for --model, or 'engine'")
    args = parser.parse_args()
    if args.engine_url:
        table = run(args.engine_url.rstrip("/"), args.model, args.requests, args.tokenizer)
    else:
        with local_engine() as (url, model, tokenizer):
            table = run(url, model, args.requests, tokenizer)
    print(table)
    path = write_report("overhead", "Gateway overhead vs direct engine", table)
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
