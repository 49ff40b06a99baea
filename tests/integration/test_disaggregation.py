"""Prefill/decode disaggregation on two real CPU engines running vLLM's NixlConnector (the fleet
of test_kv_transfer.py): one `role: prefill`, one `role: decode`. The decode engine pulls the
prompt's KV from the prefill engine and answers as a unified engine would; a client leaving
mid-stream stops the work on both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from engine_adapter.launch.launcher import EngineFleet
from tests.conftest import BLOCK_SIZE, MODEL_NAME
from tests.harness import GatewayServer, gateway_config
from tests.integration.test_kv_transfer import engine_metrics, nixl_fleet  # noqa: F401 - the fleet fixture
from tests.integration.test_openai_proxy import generated, settled
from tests.integration.test_prefix_routing import text_of, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def roles(nixl_fleet: EngineFleet) -> dict[str, str]:  # noqa: F811 - the imported fixture
    prefill, decode = nixl_fleet.engines
    return {"prefill": prefill.spec.name, "decode": decode.spec.name}


@pytest.fixture(scope="module")
def gateway(nixl_fleet: EngineFleet, roles: dict[str, str], model_configs: list[dict[str, Any]]) -> Iterator[GatewayServer]:  # noqa: F811
    role_of = {name: role for role, name in roles.items()}
    engines = [
        {"name": e.spec.name, "url": e.spec.url, "kv_events_endpoint": e.spec.kv_events_endpoint, "kv_transfer": True,
         "role": role_of[e.spec.name]}
        for e in nixl_fleet.engines
    ]  # fmt: skip
    config = gateway_config(engines, models=model_configs, kv_index={"block_size": BLOCK_SIZE})
    with GatewayServer(config) as server:
        yield server


def url_of(fleet: EngineFleet, name: str) -> str:
    return fleet.by_name(name).spec.url


def external_tokens(url: str) -> float:
    return float(engine_metrics(url).prompt_tokens_by_source.get("external_kv_transfer", 0.0))


def test_a_disaggregated_answer_is_the_unified_one(
    gateway: GatewayServer, nixl_fleet: EngineFleet, roles: dict[str, str]  # noqa: F811
) -> None:
    decode_url = url_of(nixl_fleet, roles["decode"])
    before = external_tokens(decode_url)
    prompt = text_of(1101, 600) + " and so the answer is"
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}
    raw = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0).completions.with_raw_response.create(
        **body
    )
    completion = raw.parse()
    assert raw.headers["x-gateway-prefill-engine"] == roles["prefill"]
    assert raw.headers["x-gateway-engine"] == roles["decode"]
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="complete") >= 1
    # The decode engine computed (almost) nothing: the prompt's KV came over NIXL.
    prompt_tokens = completion.usage.prompt_tokens
    wait_until(lambda: external_tokens(decode_url) - before >= prompt_tokens - BLOCK_SIZE, 15,
               "the decode engine's external_kv_transfer tokens")  # fmt: skip
    # Unified: the whole request on one engine, recomputed (a cache salt keeps caches out).
    unified = httpx.post(f"{decode_url}/v1/completions", json={**body, "cache_salt": "unified"}, timeout=120).json()
    assert unified["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    choice, reference = completion.choices[0], unified["choices"][0]
    assert choice.text == reference["text"] and len(choice.logprobs.tokens) == 12
    assert choice.logprobs.tokens == reference["logprobs"]["tokens"]
    # Up to float rounding (a prefill on another engine sums in another order; see
    # test_kv_transfer.py for the sizes measured): KV that is wrong moves them by whole units.
    for ours, theirs in zip(choice.logprobs.token_logprobs, reference["logprobs"]["token_logprobs"], strict=True):
        assert ours == pytest.approx(theirs, abs=0.05)


def test_a_streamed_chat_answer_is_the_unified_one(
    gateway: GatewayServer, nixl_fleet: EngineFleet, roles: dict[str, str]  # noqa: F811
) -> None:
    messages = [{"role": "user", "content": text_of(2202, 400)}]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0, stream=True  # type: ignore[arg-type]
    ) as resp:
        assert resp.headers["x-gateway-engine"] == roles["decode"]
        text = ""
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[len("data: "):])["choices"]:
                    text += choice["delta"].get("content") or ""
    unified = httpx.post(f"{url_of(nixl_fleet, roles['prefill'])}/v1/chat/completions", timeout=120, json={
        "model": MODEL_NAME, "messages": messages, "max_tokens": 10, "temperature": 0, "cache_salt": "unified"}).json()  # fmt: skip
    assert text and text == unified["choices"][0]["message"]["content"]


def test_leaving_a_disaggregated_stream_stops_both_engines(
    gateway: GatewayServer, nixl_fleet: EngineFleet, roles: dict[str, str]  # noqa: F811
) -> None:
    prefill_url, decode_url = url_of(nixl_fleet, roles["prefill"]), url_of(nixl_fleet, roles["decode"])
    max_tokens = 6000
    before = {url: settled([url]) for url in (prefill_url, decode_url)}
    disconnects = gateway.metric("gateway_disaggregated_requests_total", outcome="client_disconnected")
    body = {"model": MODEL_NAME, "prompt": text_of(3303, 300), "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip
    received = 0
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.headers["x-gateway-prefill-engine"] == roles["prefill"]
        for chunk in resp.iter_raw():
            received += chunk.count(b"data: ")
            if received >= 20:  # decoding, for sure: leave mid-stream
                break
    assert received >= 20
    after = {url: settled([url]) for url in (prefill_url, decode_url)}  # both idle again
    assert after[decode_url] - before[decode_url] < max_tokens, "the decode engine finished for nobody"
    assert after[prefill_url] - before[prefill_url] <= 1  # the prefill's one token, nothing more
    wait_until(lambda: gateway.metric("gateway_disaggregated_requests_total", outcome="client_disconnected")
               > disconnects, 10, "the disconnect counted")  # fmt: skip
    assert gateway.metric("gateway_engine_in_flight") == 0
    # Both engines serve on.
    assert httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "still", "max_tokens": 2},
                      timeout=60).status_code == 200  # fmt: skip
    assert generated([prefill_url, decode_url]) > after[prefill_url] + after[decode_url]
