"""What the gateway finds out for itself about engines it did not launch: the block size, a
tokenizer whose ids equal the engine's, and what it reports when it cannot (fake engines whose
/tokenize uses the real tiny-model tokenizer, so "equal" is real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import ConfigError, parse_config
from gateway.tokenization.models import PROBES
from gateway.tokenization.tokenizer import HFPromptTokenizer
from tests.unit.fake_engines import Engines

def gateway(engines: Engines, **sections: Any) -> TestClient:
    config = parse_config({"engines": [{"name": n, "url": f"http://{n}"} for n in "ab"], "health": {"interval_s": 600},
                           **sections})  # fmt: skip
    return TestClient(build_app(config, transport=httpx.MockTransport(engines.handler)))


def metric(client: TestClient, name: str, model: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {model} not exported")


def test_with_no_tokenizer_configured_the_models_own_files_are_used_once_they_match(engines: Engines) -> None:
    with gateway(engines) as client:
        assert client.get("/health").json() == {"status": "ok", "engines_available": 2, "engines_total": 2,
                                                "problems": []}  # fmt: skip
        assert client.app.state.runtime.layout.block_size == 32  # type: ignore[attr-defined]  # from the engines
        assert client.app.state.runtime.tokenizers.status["m"].source.startswith("local ")  # type: ignore[attr-defined]
        assert metric(client, "gateway_tokenizer_ready", "m") == 1
        checked = engines.asked("/tokenize")
        assert checked == len(PROBES)  # the check, and nothing per request from now on
        resp = client.post("/v1/completions", json={"model": "m", "prompt": "hello there", "max_tokens": 1})
        assert resp.status_code == 200
        assert engines.asked("/tokenize") == checked and engines.asked("/v1/completions/render") == 0
        assert int(resp.headers["x-gateway-prompt-tokens"]) > 0


def test_a_tokenizer_that_disagrees_is_not_used_and_health_says_why(engines: Engines, tiny_model_dir: Path) -> None:
    engines.shift = 1
    with gateway(engines, models=[{"name": "m", "tokenizer": str(tiny_model_dir)}]) as client:
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        assert "other token ids than engine" in health["problems"][0] and "Fix:" in health["problems"][0]
        assert metric(client, "gateway_tokenizer_ready", "m") == 0
        before = engines.asked("/tokenize")
        resp = client.post("/v1/completions", json={"model": "m", "prompt": "hello there", "max_tokens": 1})
        # Still prefix-routed, with the engine's own token ids: /render refused, then /tokenize.
        assert resp.status_code == 200 and engines.asked("/tokenize") == before + 1
        assert resp.headers["x-gateway-prompt-tokens"] == str(len(engines.tokenizer.token_ids_sync(
            "/v1/completions", {"prompt": "hello there"}) or []))  # fmt: skip


def test_a_model_that_cannot_be_tokenized_is_reported_alone(
    tokenizer: HFPromptTokenizer, tiny_model_dir: Path
) -> None:
    engines = Engines(tokenizer, "/nonexistent/model", models=("m", "n"))
    engines.broken = {"n"}
    with gateway(engines) as client:
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        assert len(health["problems"]) == 1 and health["problems"][0].startswith("model n: cannot tokenize")
        assert metric(client, "gateway_tokenizer_ready", "m") == 1  # the engines tokenize for m
        assert metric(client, "gateway_tokenizer_ready", "n") == 0
        resp = client.post("/v1/completions", json={"model": "n", "prompt": "hello", "max_tokens": 1})
        assert resp.status_code == 200  # routed all the same, and counted
        assert client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1}).status_code == 200
        failures = [line for line in client.get("/metrics").text.splitlines()
                    if line.startswith("gateway_tokenization_failures_total")]  # fmt: skip
        assert failures == ['gateway_tokenization_failures_total{model="n"} 1.0']


def test_policies_that_need_no_prompt_never_tokenize(engines: Engines) -> None:
    with gateway(engines, routing={"policy": "round_robin"}) as client:
        for _ in range(3):
            resp = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1,
                                                             "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            assert resp.status_code == 200
        assert client.app.state.runtime.tokenizers is None  # type: ignore[attr-defined]
    assert engines.asked("/tokenize") == 0 and not any(p.endswith("/render") for p in engines.paths)


def test_an_unknown_model_is_refused_before_any_tokenization(engines: Engines) -> None:
    with gateway(engines, models=[{"name": "m", "tokenizer": "engine"}]) as client:
        before = len(engines.paths)
        resp = client.post("/v1/completions", json={"model": "nope", "prompt": "hello", "max_tokens": 1})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
        assert engines.paths[before:] == []
        assert client.get("/health").json()["status"] == "ok"


def test_a_configured_block_size_the_engines_do_not_use_stops_start_up(engines: Engines) -> None:
    with pytest.raises(ConfigError, match="kv_index.block_size is 16, but engine a uses 32"):
        with gateway(engines, kv_index={"block_size": 16}):
            pass


def test_an_engine_with_another_block_size_is_reported(engines: Engines) -> None:
    with gateway(engines) as client:
        engines.block_size = 64
        endpoint = client.app.state.runtime.registry.get("b")  # type: ignore[attr-defined]
        client.portal.call(client.app.state.runtime.checker.check, endpoint)  # type: ignore[union-attr,attr-defined]
        endpoint.healthy = False  # a rejoin: the engine restarted with other flags
        client.portal.call(client.app.state.runtime.checker.check, endpoint)  # type: ignore[union-attr,attr-defined]
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        assert health["problems"] == ["engine b uses KV block size 64, the index 32"]
