"""KV transfer between two real CPU engines running vLLM's NixlConnector: the gateway moves a
cached prefix from an engine it will not use (drained) to the one it does, and recomputes
when the holder dies mid-way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine_adapter.launch.launcher import EngineFleet
from engine_adapter.metrics import parse_engine_metrics
from gateway.kvindex.base import TIER_GPU
from tests.conftest import BLOCK_SIZE, MODEL_NAME, nixl_fleet_running
from tests.harness import GatewayServer, gateway_config
from tests.integration.test_prefix_routing import text_of, wait_until

pytestmark = pytest.mark.integration

TIMEOUT_S = 8.0
ADMIN = {"authorization": "Bearer admin"}


@pytest.fixture(scope="module")
def nixl_fleet(tiny_model_dir: Path) -> Iterator[EngineFleet]:
    with nixl_fleet_running(tiny_model_dir, 2, "nixl", timeout_s=400) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def gateway(nixl_fleet: EngineFleet, model_configs: list[dict[str, Any]]) -> Iterator[GatewayServer]:
    engines = [
        {"name": e.spec.name, "url": e.spec.url, "kv_events_endpoint": e.spec.kv_events_endpoint, "kv_transfer": True}
        for e in nixl_fleet.engines
    ]
    config = gateway_config(
        engines, models=model_configs, routing={"policy": "kv_aware"}, kv_index={"block_size": BLOCK_SIZE},
        kv_transfer={"min_prefix_tokens": 256, "timeout_s": TIMEOUT_S}, server={"admin_token": "admin"},
    )  # fmt: skip
    with GatewayServer(config) as server:
        yield server


def engine_metrics(url: str) -> Any:
    return parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def held_on_gpu(gateway: GatewayServer, prompt: str, engine: str) -> int:
    resp = httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": prompt}, headers=ADMIN, timeout=30)
    resp.raise_for_status()
    return int(resp.json()["engines"].get(engine, {}).get("matched_chunks_by_tier", {}).get(TIER_GPU, 0))


def cache_prefix_on_one_engine(gateway: GatewayServer, prefix: str) -> tuple[str, str]:
    """Send the prefix once; returns (holder, other) once the holder's events are indexed."""
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL_NAME, "prompt": prefix, "max_tokens": 1}, timeout=60)
    assert resp.status_code == 200, resp.text
    holder = resp.headers["x-gateway-engine"]
    wait_until(lambda: held_on_gpu(gateway, prefix, holder) > 0, 10, "the holder's KV events")
    other = next(e["id"] for e in httpx.get(f"{gateway.url}/admin/engines", headers=ADMIN).json()["engines"] if e["id"] != holder)
    return holder, other


def set_draining(gateway: GatewayServer, engine: str, draining: bool) -> None:
    action = "drain" if draining else "undrain"
    assert httpx.post(f"{gateway.url}/admin/engines/{engine}/{action}", headers=ADMIN).status_code == 200


def greedy(client: openai.OpenAI, prompt: str, **extra: Any) -> Any:
    return client.completions.with_raw_response.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=1, **extra
    )


def test_prefix_moves_to_the_engine_that_serves_and_the_answer_is_a_recompute(
    gateway: GatewayServer, nixl_fleet: EngineFleet
) -> None:
    prefix = text_of(31337, 1200)
    holder, target = cache_prefix_on_one_engine(gateway, prefix)
    target_url = nixl_fleet.by_name(target).spec.url
    before = engine_metrics(target_url).prompt_tokens_by_source.get("external_kv_transfer", 0.0)
    set_draining(gateway, holder, True)
    try:
        raw = greedy(openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x"), prefix + " and then the question")
    finally:
        set_draining(gateway, holder, False)
    completion = raw.parse()
    assert raw.headers["x-gateway-engine"] == target
    assert gateway.metric("gateway_kv_transfers_total", outcome="succeeded") == 1
    moved = gateway.metric("gateway_kv_transfer_tokens_total", source=holder, target=target)
    prompt_tokens = completion.usage.prompt_tokens
    assert moved >= prompt_tokens - 2 * BLOCK_SIZE  # the block-aligned prefix, not a part of it
    # The target's own metrics: the tokens came over NIXL, and the request then hit them.
    wait_until(
        lambda: engine_metrics(target_url).prompt_tokens_by_source.get("external_kv_transfer", 0.0) - before >= moved,
        10, "the target's external_kv_transfer counter",
    )  # fmt: skip
    assert completion.usage.prompt_tokens_details.cached_tokens >= moved - BLOCK_SIZE
    assert abs(completion.usage.prompt_tokens_details.cached_tokens - int(raw.headers["x-gateway-predicted-cached-tokens"])) <= BLOCK_SIZE
    # Greedy with logprobs, identical to recomputing it from scratch on the same engine
    # (a cache salt keeps the target's cache out of it).
    recomputed = httpx.post(f"{target_url}/v1/completions", json={
        "model": MODEL_NAME, "prompt": prefix + " and then the question", "max_tokens": 8, "temperature": 0,
        "logprobs": 1, "cache_salt": "recompute"}, timeout=60).json()  # fmt: skip
    assert recomputed["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert completion.choices[0].text == recomputed["choices"][0]["text"]
    assert completion.choices[0].logprobs.tokens == recomputed["choices"][0]["logprobs"]["tokens"]
    # Logprobs agree up to float rounding: a prefill split across two engines sums in another
    # order than one pass. Measured here, on a busy machine: differences of 0.0077 and 0.0078
    # (of ~7.2) in two runs; KV that is wrong moves them by whole units.
    for ours, theirs in zip(completion.choices[0].logprobs.token_logprobs, recomputed["choices"][0]["logprobs"]["token_logprobs"], strict=True):
        assert ours == pytest.approx(theirs, abs=0.05)
    # The index learns the new holder from the target's own BlockStored events.
    wait_until(lambda: held_on_gpu(gateway, prefix, target) >= moved // BLOCK_SIZE, 10, "the target's KV events")
    explained = httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": prefix + " again"},
                           headers=ADMIN, timeout=30).json()  # fmt: skip
    assert explained["transfer_model"]["num_samples"] == 1
    assert gateway.metric("gateway_kv_transfer_ttft_seconds_total", kind="observed") > 0


def test_debug_route_shows_the_transfer_option(gateway: GatewayServer) -> None:
    prefix = text_of(4242, 1000)
    holder, target = cache_prefix_on_one_engine(gateway, prefix)
    set_draining(gateway, holder, True)
    try:
        explained = httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": prefix + " x"},
                               headers=ADMIN, timeout=30).json()  # fmt: skip
    finally:
        set_draining(gateway, holder, False)
    assert explained["chosen"] == target
    option = explained["engines"][target]["transfer"]
    assert option["source"] == holder and option["chosen"] is True
    assert explained["engines"][target]["chosen_option"] == "peer_pull"
    assert option["prefix_tokens"] % BLOCK_SIZE == 0 and option["moved_tokens"] >= 256
    assert option["estimated_ttft_s"] < explained["engines"][target]["options"]["recompute"]


def test_holder_dying_mid_transfer_still_answers_by_recomputing(
    gateway: GatewayServer, nixl_fleet: EngineFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = text_of(2718, 1200)
    holder, target = cache_prefix_on_one_engine(gateway, prefix)
    target_url = nixl_fleet.by_name(target).spec.url
    expected = httpx.post(f"{target_url}/v1/completions", json={
        "model": MODEL_NAME, "prompt": prefix + " question", "max_tokens": 8, "temperature": 0,
        "cache_salt": "expected"}, timeout=60).json()["choices"][0]["text"]  # fmt: skip

    # Kill the holder right after it has prepared its blocks, before the target reads them.
    nixl = gateway.app.state.runtime.generation.transfers._transfer
    prepare = nixl.prepare

    async def prepare_then_die(*args: Any, **kwargs: Any) -> Any:
        params = await prepare(*args, **kwargs)
        nixl_fleet.by_name(holder).kill()
        return params

    monkeypatch.setattr(nixl, "prepare", prepare_then_die)
    fell_back = gateway.metric("gateway_kv_transfers_total", outcome="fell_back")
    set_draining(gateway, holder, True)
    started = time.monotonic()
    try:
        raw = greedy(openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0), prefix + " question")
    finally:
        set_draining(gateway, holder, False)
        monkeypatch.undo()
    elapsed = time.monotonic() - started
    assert raw.headers["x-gateway-engine"] == target
    assert raw.parse().choices[0].text == expected
    assert elapsed < TIMEOUT_S + 10
    assert gateway.metric("gateway_kv_transfers_total", outcome="fell_back") == fell_back + 1
    # The target is still healthy and serving.
    ok = httpx.post(f"{target_url}/v1/completions", json={"model": MODEL_NAME, "prompt": "still there?", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
