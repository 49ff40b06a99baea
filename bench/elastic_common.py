"""What the elastic fleet benches (bench.elastic_join, bench.elastic_drain) share: two local CPU
engines with vLLM's NixlConnector, one core each; a gateway configuration with the kv_aware
policy over them; prompts of shared long prefixes; a streamed replay that records each
request's TTFT, engine and cached tokens (the engine's `usage.prompt_tokens_details`)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from bench.common import ROOT, free_port, read_event_stream

if TYPE_CHECKING:
    from engine_adapter.launch.launcher import EngineSpec

MODEL = "tiny-llama"
BLOCK = 32
ADMIN = {"authorization": "Bearer bench-admin"}


@dataclass(frozen=True, slots=True)
class Sample:
    sent_at: float
    ttft_s: float
    engine: str
    prompt_tokens: int
    cached_tokens: int
    prompt: str = ""


def words(rng: random.Random, n: int) -> str:
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n))


def question(rng: random.Random) -> str:
    """What a request adds to its shared prefix: its own few words."""
    return " question " + words(rng, 12)


async def send(client: httpx.AsyncClient, url: str, prompt: str) -> Sample:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        ttft, usage = await read_event_stream(resp, start)
    details = usage.get("prompt_tokens_details") or {}
    return Sample(start, ttft if ttft is not None else time.perf_counter() - start, resp.headers.get("x-gateway-engine", ""),
                  int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0), prompt)  # fmt: skip


async def replay(url: str, prompts: list[str], concurrency: int) -> list[Sample]:
    """The prompts in order, `concurrency` at a time; the samples in the order they finished."""
    queue = list(reversed(prompts))
    samples: list[Sample] = []
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker() -> None:
            while queue:
                samples.append(await send(client, url, queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def nixl_engine_specs(count: int = 2) -> list[EngineSpec]:
    """`count` engines of the tiny model (built on first use), with NIXL, engine i on core i % 2."""
    from engine_adapter.launch.launcher import EngineSpec
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    return [
        EngineSpec(name=f"bench-elastic-{i}", model_dir=str(model_dir), served_model_name=MODEL, port=free_port(),
                   kv_events_port=free_port(), cpu_bind=str(i % 2), kv_transfer_port=free_port(), max_model_len=16384)  # fmt: skip
        for i in range(count)
    ]


def engine_entry(spec: EngineSpec) -> dict[str, Any]:
    """The engine as one `engines` entry of the gateway's configuration (or POST /admin/engines)."""
    return {"name": spec.name, "url": spec.url, "kv_events_endpoint": spec.kv_events_endpoint, "kv_transfer": True}


def gateway_config(engines: list[EngineSpec], elastic: dict[str, Any]) -> dict[str, Any]:
    """kv_aware over `engines`, per-request KV transfers of 256+ tokens, the admin API on."""
    return {
        "engines": [engine_entry(s) for s in engines], "routing": {"policy": "kv_aware"},
        "kv_index": {"block_size": BLOCK}, "kv_transfer": {"min_prefix_tokens": 256},
        "elastic": {"max_s": 120, **elastic}, "server": {"admin_token": "bench-admin"},
    }  # fmt: skip
