"""Malformed requests get an OpenAI-shaped 400 that names the field, one log line at most and
no traceback; nothing malformed reaches the tokenizer or the index."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import parse_config
from tests.unit.fake_engines import Engines


@pytest.fixture()
def client(engines: Engines) -> Iterator[TestClient]:
    config = parse_config({"engines": [{"name": n, "url": f"http://{n}"} for n in "ab"], "health": {"interval_s": 600}})
    with TestClient(build_app(config, transport=httpx.MockTransport(engines.handler))) as test_client:
        yield test_client


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TEXT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, b'{"model": "tiny-llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (COMPLETIONS, b'{"model": "tiny-llama", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None),
        (CHAT, {"model": "m", "messages": 5}, "messages"),
        (CHAT, {"model": "m", "messages": True}, "messages"),
        (CHAT, {"model": "m", "messages": [5]}, "messages[0]"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages[0].content[0].text"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
         "messages[0].content[0].text"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        (COMPLETIONS, {"model": "m", "prompt": [1, -1]}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": [1, 2**32]}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": [[1], [True]]}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": {"a": 1}}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": "x", "cache_salt": 5}, "cache_salt"),
        (COMPLETIONS, {"model": "m", "prompt": "x", "stream": "maybe"}, "stream"),
        (CHAT, {"model": "m", "messages": TEXT, "chat_template": "{% for x in y %}{% endfor %}"}, "chat_template"),
        (CHAT, {"model": "m", "messages": TEXT, "chat_template_kwargs": {"chat_template": "{{ 'x' * 300000000 }}"}},
         "chat_template"),
        (CHAT, {"model": "m", "messages": TEXT, "chat_template_kwargs": 3}, "chat_template_kwargs"),
        (COMPLETIONS, {"model": "m", "prompt": "x", "kv_transfer_params": {"do_remote_prefill": True,
         "remote_host": "10.0.0.1", "remote_port": 5600}}, "kv_transfer_params"),
        (CHAT, {"model": "m", "messages": TEXT, "kv_transfer_params": None}, "kv_transfer_params"),
    ],
)  # fmt: skip
def test_malformed_fields_get_a_400_naming_them(
    client: TestClient, caplog: pytest.LogCaptureFixture, path: str, body: object, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with caplog.at_level(logging.WARNING):
        resp = client.post(path, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("field", ["cache_salt", "model"])
def test_a_lone_surrogate_is_a_400(client: TestClient, field: str) -> None:
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 1, field: "PLACEHOLDER"}
    content = json.dumps(body).replace('"PLACEHOLDER"', '"\\ud800"').encode()
    resp = client.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field


def test_a_string_stream_flag_means_what_it_says(client: TestClient, engines: Engines) -> None:
    """vLLM reads "false" as false; so does the gateway, and it does not turn the request
    into a stream by asking for a stream's usage event."""
    resp = client.post(COMPLETIONS, json={"model": "m", "prompt": "hello", "max_tokens": 1, "stream": "false"})
    assert resp.status_code == 200
    assert engines.sent and b"stream_options" not in engines.sent[-1]
    assert resp.headers["content-type"].startswith("application/json")
