"""A shared KV store between two real CPU engines (one LMCache server, vLLM's
LMCacheMPConnector): a prefix engine A computed, then lost from its own cache, is served to
engine B from the store, the gateway's index shows B the store tier beforehand and predicts
the tokens B reports, and the answer is what recomputing gives."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine_adapter.launch.kv_store import CHUNK_SIZE_TOKENS, KVStoreSpec
from engine_adapter.launch.launcher import EngineFleet, local_specs
from engine_adapter.metrics import parse_engine_metrics
from gateway.kvindex.base import TIER_GPU, TIER_STORAGE
from tests.conftest import BLOCK_SIZE, MODEL_NAME, ROOT
from tests.harness import GatewayServer, free_port, gateway_config
from tests.integration.test_prefix_routing import text_of, wait_until

pytestmark = pytest.mark.integration

ADMIN = {"authorization": "Bearer admin"}
STORE = "shared"
# A small device cache (2,304 tokens): two other 1.5k-token prompts push a prefix out of it.
NUM_GPU_BLOCKS = 72
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def store_fleet(tiny_model_dir: Path) -> Iterator[EngineFleet]:
    store = KVStoreSpec("test-store", port=free_port(), http_port=free_port(), l1_size_gib=1)
    specs = local_specs(
        2, model_dir=str(tiny_model_dir), served_model_name=MODEL_NAME, base_port=free_port(),
        max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=NUM_GPU_BLOCKS, kv_store_port=store.port,
    )  # fmt: skip
    specs = [replace(s, port=free_port(), kv_events_port=free_port()) for s in specs]
    fleet = EngineFleet(specs, ROOT / ".cache" / "test-engine-logs" / "kv-store", kv_store=store)
    fleet.start(timeout_s=400)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def gateway(store_fleet: EngineFleet, model_configs: list[dict[str, Any]]) -> Iterator[GatewayServer]:
    engines = [
        {"name": e.spec.name, "url": e.spec.url, "kv_events_endpoint": e.spec.kv_events_endpoint, "kv_store": STORE}
        for e in store_fleet.engines
    ]
    config = gateway_config(engines, models=model_configs, kv_index={"block_size": BLOCK_SIZE},
                            server={"admin_token": "admin"})  # fmt: skip
    with GatewayServer(config) as server:
        yield server


def explained(gateway: GatewayServer, prompt: str, engine: str) -> dict[str, Any]:
    """What /debug/route says of `engine` for `prompt`."""
    resp = httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": prompt}, headers=ADMIN, timeout=30)
    resp.raise_for_status()
    return dict(resp.json()["engines"].get(engine, {}))


def held(gateway: GatewayServer, prompt: str, engine: str) -> dict[str, int]:
    """The chunks of `prompt` the gateway's index says `engine` holds, per tier."""
    return dict(explained(gateway, prompt, engine).get("matched_chunks_by_tier", {}))


def complete_on(url: str, prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "logprobs": 1}, timeout=120)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def external_tokens(url: str) -> float:
    stats = parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    return stats.prompt_tokens_by_source.get("external_kv_transfer", 0.0)


def set_draining(gateway: GatewayServer, engine: str, draining: bool) -> None:
    action = "drain" if draining else "undrain"
    assert httpx.post(f"{gateway.url}/admin/engines/{engine}/{action}", headers=ADMIN).status_code == 200


def test_a_prefix_evicted_from_one_engine_is_served_to_the_other_from_the_store(
    gateway: GatewayServer, store_fleet: EngineFleet
) -> None:
    engine_a, engine_b = store_fleet.engines
    a, b = engine_a.spec.name, engine_b.spec.name
    prompt = text_of(8080, 700)
    # Engine A computes it cold: the reference answer, and the store's copy.
    cold = complete_on(engine_a.spec.url, prompt)
    num_prompt_tokens = cold["usage"]["prompt_tokens"]
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert 1200 <= num_prompt_tokens <= 1700, "the prompt no longer fits the cache sizes chosen here"
    # The store keeps whole 256-token chunks; the index must know exactly those, as blocks.
    store_blocks = num_prompt_tokens // CHUNK_SIZE_TOKENS * (CHUNK_SIZE_TOKENS // BLOCK_SIZE)
    # Other prompts push it out of A's device cache (A's BlockRemoved events say so).
    for seed in (1, 2, 3):
        complete_on(engine_a.spec.url, text_of(9000 + seed, 700), max_tokens=2)
        if held(gateway, prompt, a).get(TIER_GPU, 0) == 0:
            break
    wait_until(lambda: held(gateway, prompt, a).get(TIER_GPU, 0) == 0, 20, "A's eviction in the index")
    # Before the request: the index shows B (which never saw the prompt) the store's chunks.
    wait_until(lambda: held(gateway, prompt, b).get(TIER_STORAGE, 0) == store_blocks, 20, "the store tier for B")
    assert held(gateway, prompt, b).get(TIER_GPU, 0) == 0
    # ... and prices serving it on B as a store load: no own hit, cheaper than recomputing.
    on_b = explained(gateway, prompt, b)
    assert on_b["chosen_option"] == "store_load" and on_b["options"]["own_hit"] is None
    assert on_b["store_load"]["loaded_tokens"] >= (store_blocks - 1) * BLOCK_SIZE  # never the last token
    assert on_b["options"]["store_load"] < on_b["options"]["recompute"]
    before = external_tokens(engine_b.spec.url)

    set_draining(gateway, a, True)
    try:
        raw = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x").completions.with_raw_response.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=1
        )
    finally:
        set_draining(gateway, a, False)
    served = raw.parse()
    assert raw.headers["x-gateway-engine"] == b
    cached = served.usage.prompt_tokens_details.cached_tokens
    # B loaded the store's chunks (LMCache loads whole chunks) and reports them as cached...
    assert cached >= store_blocks * BLOCK_SIZE - 1
    wait_until(lambda: external_tokens(engine_b.spec.url) - before >= store_blocks * BLOCK_SIZE - 1, 10,
               "B's external_kv_transfer counter")  # fmt: skip
    # ... which the gateway predicted from the store tier (to within a block: vLLM may count
    # the loaded tokens up to the prompt's last but one).
    assert abs(cached - int(raw.headers["x-gateway-predicted-cached-tokens"])) <= BLOCK_SIZE
    wait_until(lambda: gateway.metric("gateway_cached_tokens_predictions_total", verdict="within_one_block") >= 1, 10,
               "the gateway's check of its prediction")  # fmt: skip
    assert gateway.metric("gateway_cached_tokens_predictions_total", verdict="over") == 0
    # Greedy with logprobs: identical to A's cold computation.
    reference = cold["choices"][0]
    assert served.choices[0].text == reference["text"]
    assert served.choices[0].logprobs.tokens == reference["logprobs"]["tokens"]
    for ours, theirs in zip(served.choices[0].logprobs.token_logprobs, reference["logprobs"]["token_logprobs"], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-3)
    # B's own events then put the prefix in its device cache in the index.
    wait_until(lambda: held(gateway, prompt, b).get(TIER_GPU, 0) >= store_blocks, 10, "B's KV events")


def store_samples(gateway: GatewayServer) -> float:
    resp = httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": "x"}, headers=ADMIN, timeout=30)
    resp.raise_for_status()
    return float(resp.json()["store_model"]["num_samples"])


def test_a_streamed_answer_loaded_from_the_store_calibrates_the_store_model(
    gateway: GatewayServer, store_fleet: EngineFleet
) -> None:
    engine_a, engine_b = store_fleet.engines
    a, b = engine_a.spec.name, engine_b.spec.name
    prompt = text_of(7070, 700)
    complete_on(engine_a.spec.url, prompt, max_tokens=1)  # A writes it to the store
    wait_until(lambda: held(gateway, prompt, b).get(TIER_STORAGE, 0) > 0, 20, "the store tier for B")
    before = store_samples(gateway)
    set_draining(gateway, a, True)
    try:
        with httpx.stream("POST", f"{gateway.url}/v1/completions", timeout=120,
                          json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2, "stream": True}) as resp:  # fmt: skip
            assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == b
            resp.read()
    finally:
        set_draining(gateway, a, False)
    # B reported the loaded tokens as cached: its time to first token is the store model's sample.
    wait_until(lambda: store_samples(gateway) == before + 1, 10, "the store model's sample")
