"""The gateway in front of real CPU vLLM engines, driven with the official OpenAI SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from engine_adapter.metrics import parse_engine_metrics
from tests.conftest import EMBED_MODEL_NAME, MODEL_NAME
from tests.harness import GatewayServer, gateway_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(engine_configs: list[dict[str, Any]]) -> Iterator[GatewayServer]:
    config = gateway_config(engine_configs, proxy={"max_body_bytes": 64 * 1024}, routing={"policy": "least_loaded"})
    with GatewayServer(config) as server:
        yield server


@pytest.fixture()
def client(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def engine_running(url: str) -> float:
    return parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=5).text).num_requests_running


def test_chat_completion(client: openai.OpenAI, engine_configs: list[dict[str, Any]]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0
    )
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert raw.headers["x-gateway-engine"] in {e["name"] for e in engine_configs}
    assert raw.headers["x-request-id"]


def test_chat_completion_streams_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Count."}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # vLLM merges tokens into one chunk when its reader lags, so count tokens, not chunks.
    assert len(chunks) >= 3
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_completion_and_streamed_completion_agree(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0)
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in streamed)
    assert plain.choices[0].text == text  # greedy: the same engine-side result either way
    assert plain.usage is not None and plain.usage.completion_tokens == 10


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL_NAME in ids


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body is not None and "no-such-model" in info.value.body["message"]  # type: ignore[index]


def test_engine_4xx_is_passed_through(client: openai.OpenAI) -> None:
    # Asking for more tokens than the context holds is the engine's 400, not ours.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=10_000_000)
    assert "max_tokens" in str(info.value) or "context" in str(info.value)


def test_malformed_json_is_400(gateway: GatewayServer) -> None:
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in resp.json()["error"]["message"]


def test_missing_model_is_400(gateway: GatewayServer) -> None:
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "hi"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "model"


def test_oversized_body_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL_NAME, prompt="word " * 40_000, max_tokens=1)
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"  # type: ignore[index]


def test_request_id_is_echoed(gateway: GatewayServer) -> None:
    resp = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
        headers={"x-request-id": "client-chosen-id-42"},
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "client-chosen-id-42"
    assert "client-chosen-id-42" in resp.json()["id"]  # the engine saw it too


def test_stream_is_not_buffered(gateway: GatewayServer) -> None:
    body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    first_chunk_at = None
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as resp:
        for _ in resp.iter_raw():
            if first_chunk_at is None:
                first_chunk_at = time.perf_counter() - started
    total = time.perf_counter() - started
    assert first_chunk_at is not None
    # 400 tokens take a while to generate; the first must arrive long before the last.
    assert first_chunk_at < total / 4, (first_chunk_at, total)


def test_abandoned_stream_is_aborted_on_the_engine(gateway: GatewayServer, engine_configs: list[dict[str, Any]]) -> None:
    urls = {e["name"]: e["url"] for e in engine_configs}
    body = {"model": MODEL_NAME, "prompt": "Go on", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as resp:
        engine_url = urls[resp.headers["x-gateway-engine"]]
        # Keep reading until the engine's own metrics show the request running (they are
        # published once per engine step, a little after the first tokens).
        deadline = time.monotonic() + 10
        seen_running = False
        received = b""
        for chunk in resp.iter_raw():
            received += chunk
            if engine_running(engine_url) >= 1:
                seen_running = True
                break
            if time.monotonic() > deadline:
                break
        assert seen_running, f"the engine never reported the stream as running; got {received[-500:]!r}"
    # Leaving the block closes the connection mid-stream.
    deadline = time.monotonic() + 5
    while engine_running(engine_url) != 0:
        assert time.monotonic() < deadline, "engine kept generating for an abandoned stream"
        time.sleep(0.2)
    assert gateway.metric("gateway_client_disconnects_total") >= 1


def test_no_healthy_engine_is_503() -> None:
    config = gateway_config(
        [{"name": "down", "url": "http://127.0.0.1:9", "models": [MODEL_NAME]}], health={"interval_s": 60}
    )
    with GatewayServer(config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "no_healthy_engine"  # type: ignore[index]
        assert json.loads(httpx.get(f"{server.url}/health").text)["status"] == "unavailable"


def test_embeddings_go_to_the_engine_that_serves_the_model(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model=EMBED_MODEL_NAME, input=["first text", "second text"])
    result = raw.parse()
    assert raw.headers["x-gateway-engine"] == "embed-0"
    assert len(result.data) == 2 and len(result.data[0].embedding) == 256
    assert result.data[0].embedding != result.data[1].embedding
