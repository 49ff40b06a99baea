"""What the server process does for many connections: what start-up built is kept out of the
garbage collector's full passes (gateway.app.freeze_long_lived). (The open-file limit:
tests/unit/test_limits*.py, gateway.limits.open_files.)"""

from __future__ import annotations

import gc

import httpx
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import parse_config
from tests.unit.fake_engines import Engines


def test_the_server_freezes_what_start_up_built(engines: Engines) -> None:
    config = parse_config({"engines": [{"name": "a", "url": "http://a"}], "health": {"interval_s": 600},
                           "models": [{"name": "m", "tokenizer": engines.root}]})  # fmt: skip
    gc.unfreeze()
    try:
        with TestClient(build_app(config, transport=httpx.MockTransport(engines.handler))):
            assert gc.get_freeze_count() == 0  # tests and embedders: untouched
        with TestClient(build_app(config, transport=httpx.MockTransport(engines.handler), freeze_gc=True)) as client:
            assert gc.get_freeze_count() > 0
            assert client.post("/v1/completions", json={"model": "m", "prompt": "hi"}).status_code == 200
    finally:
        gc.unfreeze()
