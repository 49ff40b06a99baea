"""KV transfer against recomputing and against waiting for a busy holder, on two local CPU
engines running vLLM's NixlConnector, for prefixes of 1k-8k tokens.

    python -m bench.transfer [--lengths 1024,2048,4096,8192] [--repeats 3] [--busy-tokens 6144]

Engine A holds the prefix; the request (prefix + 32 new tokens, one output token) can be
  recompute   sent to idle engine B, which prefills all of it;
  transfer    moved A -> B with the NIXL pull flow (engine_adapter.transfer), then sent to B;
              measured with A idle (A draining, say) and with A busy;
  wait        sent to A while A is busy prefilling another, uncached prompt (--busy-tokens).
Every measurement uses fresh token ids, so nothing is cached by accident. The times are from
sending to the answer, transfer included.

The gateway's own estimator (gateway.routing.ttft, the kv_aware scorer's numbers) is first
calibrated on other sizes, then asked, for each row, which option it would take when A is idle
but cannot serve (recompute or transfer) and when A is busy (all three); the table shows its
pick next to the fastest measured. Prints the table and the crossover length (the shortest
prefix that transfer moves faster than B recomputes) and writes a report.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from bench.common import LOG_DIR, ROOT, free_port, markdown_table, median, write_report
from engine_adapter.transfer.nixl import EngineAddress, NixlPullTransfer
from gateway.kvindex.layout import KVLayout
from gateway.config import KVTransferConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU, PrefixMatch
from gateway.routing.cost_model import CostModel
from gateway.routing.ttft import TTFTEstimator
from gateway.types import EngineId, RequestChunkKey, RoutingRequest

MODEL = "tiny-llama"
BLOCK = 32
TAIL = 32
BUSY_HEAD_START_S = 0.05
TRANSFER = KVTransferConfig(min_prefix_tokens=BLOCK)


class Engines:
    def __init__(self, client: httpx.AsyncClient, a: str, b: str) -> None:
        self.client = client
        self.a, self.b = EngineAddress(a), EngineAddress(b)
        self.nixl = NixlPullTransfer(client)
        self._rng = random.Random(7)

    def fresh(self, n: int) -> list[int]:
        return [self._rng.randint(10, 4000) for _ in range(n)]

    async def complete(self, engine: EngineAddress, prompt: list[int]) -> float:
        """Seconds until the one-token answer (its time to first token)."""
        started = time.perf_counter()
        resp = await self.client.post(f"{engine.url}/v1/completions",
                                      json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0})  # fmt: skip
        resp.raise_for_status()
        return time.perf_counter() - started

    async def while_busy(self, engine: EngineAddress, busy_tokens: int, measure: Callable[[], Awaitable[float]]) -> float:
        """`measure` while `engine` prefills `busy_tokens` uncached tokens sent just before."""
        busy = asyncio.create_task(self.complete(engine, self.fresh(busy_tokens)))
        await asyncio.sleep(BUSY_HEAD_START_S)
        try:
            return await measure()
        finally:
            await busy

    async def transfer_then_serve(self, prefix: list[int], tail: list[int]) -> tuple[float, float]:
        """(total seconds, of which the transfer)."""
        started = time.perf_counter()
        timings = await self.nixl.transfer(self.a, self.b, MODEL, prefix, timeout_s=30, request_id=f"bench-{time.time_ns()}")
        await self.complete(self.b, prefix + tail)
        return time.perf_counter() - started, timings.total_s


@dataclass
class Row:
    length: int
    recompute: list[float]
    transfer_idle: list[float]
    transfer_busy: list[float]
    wait_busy: list[float]


async def calibrate(engines: Engines, estimator: TTFTEstimator, sizes: list[int]) -> None:
    """Feed the gateway's cost models with sizes the rows do not use. The first transfer
    between two engines includes NIXL's handshake (the gateway pays it once per pair): a
    warm-up transfer comes first and is not counted."""
    warm = engines.fresh(512)
    await engines.complete(engines.a, warm)
    await engines.transfer_then_serve(warm, engines.fresh(TAIL))
    for n in sizes:
        estimator.cost_model.observe(0, n, await engines.complete(engines.b, engines.fresh(n)), 0.0)
        prefix = engines.fresh(n // BLOCK * BLOCK)
        await engines.complete(engines.a, prefix)
        estimator.cost_model.observe(len(prefix) - BLOCK, len(prefix) + TAIL, await engines.complete(engines.a, prefix + engines.fresh(TAIL)), 0.0)
        _, transfer_s = await engines.transfer_then_serve(prefix, engines.fresh(TAIL))
        estimator.transfer_model.observe(EngineId("b"), n // BLOCK * BLOCK, transfer_s)


async def measure(engines: Engines, length: int, repeats: int, busy_tokens: int) -> Row:
    row = Row(length, [], [], [], [])
    for _ in range(repeats):
        row.recompute.append(await engines.complete(engines.b, engines.fresh(length + TAIL)))
        for busy, out in ((False, row.transfer_idle), (True, row.transfer_busy)):
            prefix = engines.fresh(length)
            await engines.complete(engines.a, prefix)
            tail = engines.fresh(TAIL)
            if busy:
                async def go(prefix: list[int] = prefix, tail: list[int] = tail) -> float:
                    return (await engines.transfer_then_serve(prefix, tail))[0]

                out.append(await engines.while_busy(engines.a, busy_tokens, go))
            else:
                out.append((await engines.transfer_then_serve(prefix, tail))[0])
        prefix = engines.fresh(length)
        await engines.complete(engines.a, prefix)
        prompt = prefix + engines.fresh(TAIL)
        row.wait_busy.append(await engines.while_busy(engines.a, busy_tokens, lambda p=prompt: engines.complete(engines.a, p)))  # type: ignore[misc]
    return row


def picks(estimator: TTFTEstimator, length: int, busy_tokens: int) -> tuple[dict[str, float], dict[str, float]]:
    """The estimator's seconds per option, A idle (out of rotation) and A busy."""
    n = length + TAIL
    request = RoutingRequest(model=MODEL, api_path="/v1/completions", body={}, headers={}, request_id="bench",
                             num_prompt_tokens=n, token_ids=list(range(n)),
                             chunk_keys=[RequestChunkKey(k) for k in range(1, n // BLOCK + 1)],
                             prefix_matches={EngineId("a"): PrefixMatch(length // BLOCK, {TIER_GPU: length // BLOCK})})  # fmt: skip
    out = []
    for busy in (False, True):
        queue = max(0.0, estimator.cost_model.prefill_s(0, busy_tokens) - BUSY_HEAD_START_S) if busy else 0.0
        a = Endpoint(EngineId("a"), "http://a", configured_models=frozenset({MODEL}), kv_transfer=True,
                     pending_prefill_s=queue, in_flight=int(busy))  # fmt: skip
        b = Endpoint(EngineId("b"), "http://b", configured_models=frozenset({MODEL}), kv_transfer=True)
        situation = TTFTEstimator(estimator.cost_model, layout=KVLayout(BLOCK), registry=EndpointRegistry([a, b]),
                                  transfer_model=estimator.transfer_model, transfer_config=TRANSFER)  # fmt: skip
        on_b = situation.estimate(request, b)
        options = {"recompute": on_b.recompute_s}
        if on_b.transfer is not None:
            options["transfer"] = on_b.transfer.ttft_s
        if busy:
            options["wait"] = situation.estimate(request, a).local_s
        out.append(options)
    return out[0], out[1]


def ms(seconds: float) -> float:
    return seconds * 1000


async def run(a_url: str, b_url: str, lengths: list[int], repeats: int, busy_tokens: int) -> str:
    estimator = TTFTEstimator(CostModel(), layout=KVLayout(BLOCK))
    async with httpx.AsyncClient(timeout=120) as client:
        engines = Engines(client, a_url, b_url)
        print("calibrating the gateway's cost models on other sizes...", file=sys.stderr)
        await calibrate(engines, estimator, [768, 1536, 3072, 6144, 768, 3072])
        rows = []
        for length in lengths:
            print(f"  prefix {length} tokens x{repeats}...", file=sys.stderr)
            rows.append(await measure(engines, length, repeats, busy_tokens))
    table = []
    crossover = None
    right = 0
    for row in rows:
        measured_idle = {"recompute": median(row.recompute), "transfer": median(row.transfer_idle)}
        measured_busy = {**measured_idle, "transfer": median(row.transfer_busy), "wait": median(row.wait_busy)}
        est_idle, est_busy = picks(estimator, row.length, busy_tokens)
        pick_idle, pick_busy = min(est_idle, key=est_idle.__getitem__), min(est_busy, key=est_busy.__getitem__)
        best_idle, best_busy = min(measured_idle, key=measured_idle.__getitem__), min(measured_busy, key=measured_busy.__getitem__)
        right += (pick_idle == best_idle) + (pick_busy == best_busy)
        if crossover is None and measured_idle["transfer"] < measured_idle["recompute"]:
            crossover = row.length
        table.append([
            row.length, ms(measured_idle["recompute"]), ms(measured_idle["transfer"]), ms(measured_busy["transfer"]),
            ms(measured_busy["wait"]),
            f"{pick_idle} ({ms(est_idle[pick_idle]):.0f})", "yes" if pick_idle == best_idle else f"no: {best_idle}",
            f"{pick_busy} ({ms(est_busy[pick_busy]):.0f})", "yes" if pick_busy == best_busy else f"no: {best_busy}",
        ])  # fmt: skip
    headers = ["prefix tokens", "recompute on B ms", "transfer A->B ms (A idle)", "transfer A->B ms (A busy)",
               "wait for busy A ms", "model pick, A idle (est ms)", "fastest?", "model pick, A busy (est ms)",
               "fastest?"]  # fmt: skip
    text = markdown_table(headers, table)
    text += (
        f"\n\nMedians of {repeats} per cell; each prompt is the prefix + {TAIL} new tokens, one output token. "
        f"A busy = prefilling an uncached {busy_tokens}-token prompt sent {BUSY_HEAD_START_S * 1000:.0f} ms before. "
        f"A idle = A holds the prefix but is out of rotation (draining), so waiting is no option.\n"
        f"Crossover: transfer beats recomputing from {crossover if crossover else 'no tested'} prefix tokens. "
        f"The cost model picked the fastest measured option in {right} of {2 * len(rows)} cases.\n"
        f"Cost model after calibration: {estimator.cost_model.describe()}\n"
        f"Transfer model: {estimator.transfer_model.describe()}\n"
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-tokens", type=int, default=6144)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    from engine_adapter.launch.launcher import EngineFleet, EngineSpec
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    specs = [
        EngineSpec(name=f"bench-nixl-{i}", model_dir=str(model_dir), served_model_name=MODEL, port=free_port(),
                   cpu_bind=str(i), kv_transfer_port=free_port(), max_model_len=16384)  # fmt: skip
        for i in range(2)
    ]
    print("starting 2 local CPU engines with NIXL (about a minute)...", file=sys.stderr)
    with EngineFleet(specs, LOG_DIR):
        text = asyncio.run(run(specs[0].url, specs[1].url, lengths, args.repeats, args.busy_tokens))
    print(text)
    print(f"report: {write_report('transfer', 'KV transfer vs recompute vs waiting', text)}")


if __name__ == "__main__":
    main()
