"""POST /debug/route against fake engines: every engine's four ways of serving the request
(own hit, store load, peer pull, recompute) and the one serving it there would take."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.kvindex.base import TIER_GPU, TIER_STORAGE
from gateway.kvindex.stores import store_holder
from gateway.runtime import GatewayRuntime
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.tokenization.tokenizer import HFPromptTokenizer
from gateway.types import EngineId
from tests.harness import gateway_config
from tests.unit.fake_engines import Engines

BLOCK = 32
BODY = {"model": "m", "prompt": "The store keeps what any engine computed. " * 60}


def test_every_engine_shows_its_four_options_and_the_one_chosen(engines: Engines, tokenizer: HFPromptTokenizer) -> None:
    config = gateway_config(
        [{"name": "a", "url": "http://a", "kv_store": "s"}, {"name": "b", "url": "http://b", "kv_store": "s"},
         {"name": "c", "url": "http://c"}],
        routing={"policy": "kv_aware"}, kv_index={"block_size": BLOCK}, server={"admin_token": "admin"},
        health={"interval_s": 600},
    )  # fmt: skip
    ids = tokenizer.token_ids_sync("/v1/completions", BODY)
    assert ids is not None and len(ids) > 10 * BLOCK
    keys = chunk_keys(ids, BLOCK, chain_root("m"))
    with TestClient(build_app(config, transport=httpx.MockTransport(engines.handler))) as client:
        runtime: GatewayRuntime = client.app.state.runtime  # type: ignore[attr-defined]

        def hold() -> None:
            runtime.index.add(store_holder("s"), keys, TIER_STORAGE)  # the store: all of it
            runtime.index.add(EngineId("a"), keys[:4], TIER_GPU)  # a: the first 4 chunks itself

        client.portal.call(hold)
        resp = client.post("/debug/route", json=BODY, headers={"authorization": "Bearer admin"})
        assert resp.status_code == 200, resp.text
        explained: dict[str, Any] = resp.json()
    assert engines.sent == []  # explained, not sent
    listed = explained["engines"]
    for engine in ("a", "b", "c"):
        assert list(listed[engine]["options"]) == ["own_hit", "store_load", "peer_pull", "recompute"]
        assert listed[engine]["options"]["peer_pull"] is None  # no NIXL here
    a, b, c = listed["a"], listed["b"], listed["c"]
    # a holds 4 chunks and loads the rest from the store; b loads everything; c has no store.
    assert a["options"]["own_hit"] is not None and a["chosen_option"] == "store_load"
    assert a["store_load"]["loaded_tokens"] == a["store_load"]["cached_tokens"] - 4 * BLOCK
    assert b["options"]["own_hit"] is None and b["chosen_option"] == "store_load"
    assert c["options"]["own_hit"] is None and c["options"]["store_load"] is None and c["chosen_option"] == "recompute"
    assert a["estimated_ttft_s"] == a["options"]["store_load"] < b["options"]["store_load"] < c["options"]["recompute"]
    assert explained["chosen"] == "a"
    assert explained["store_model"]["num_samples"] == 0
