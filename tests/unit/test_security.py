"""Client API keys, the admin token, and what of a client's headers reaches the engines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import ConfigError, parse_config, with_environment
from tests.unit.fake_engines import Engines

KEYS = ["k-first-0123456789", "k-second-0123456789"]
BODY = {"model": "m", "prompt": "hello", "max_tokens": 1}


def gateway(engines: Engines, **server: Any) -> TestClient:
    config = parse_config({"engines": [{"name": "a", "url": "http://a"}], "health": {"interval_s": 600},
                           "server": server})  # fmt: skip
    return TestClient(build_app(config, transport=httpx.MockTransport(engines.handler)))


@pytest.fixture()
def keyed(engines: Engines) -> Iterator[TestClient]:
    with gateway(engines, api_keys=KEYS, admin_token="adm-0123456789") as client:
        yield client


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"x-api-key": "k-first"},
                                     {"authorization": "Basic " + KEYS[0]}])  # fmt: skip
def test_without_a_valid_key_clients_get_401(keyed: TestClient, headers: dict[str, str]) -> None:
    for method, path, body in (("POST", "/v1/completions", BODY), ("GET", "/v1/models", None),
                               ("GET", "/v1/responses/resp_x", None)):  # fmt: skip
        resp = keyed.request(method, path, json=body, headers=headers)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"


def test_either_key_works_as_a_bearer_token_or_x_api_key(keyed: TestClient, engines: Engines) -> None:
    assert keyed.post("/v1/completions", json=BODY, headers={"authorization": f"Bearer {KEYS[1]}"}).status_code == 200
    assert keyed.post("/v1/completions", json=BODY, headers={"x-api-key": KEYS[0]}).status_code == 200
    assert keyed.get("/v1/models", headers={"authorization": f"Bearer {KEYS[0]}"}).status_code == 200
    assert keyed.get("/health").status_code == 200  # probes need no key
    # The gateway's credentials stay with the gateway.
    assert all("authorization" not in h and "x-api-key" not in h for h in engines.sent_headers)


def test_only_end_to_end_headers_reach_the_engines(engines: Engines) -> None:
    with gateway(engines) as client:
        client.post("/v1/completions", json=BODY, headers={
            "x-forwarded-for": "6.6.6.6", "x-real-ip": "6.6.6.6", "forwarded": "for=6.6.6.6", "x-api-key": "k",
            "cookie": "c=1", "connection": "keep-alive, x-secret-hop", "x-secret-hop": "1", "x-trace": "kept",
        })  # fmt: skip
    sent = engines.sent_headers[-1]
    for name in ("x-forwarded-for", "x-real-ip", "forwarded", "x-api-key", "cookie", "x-secret-hop"):
        assert name not in sent, name
    assert sent["x-trace"] == "kept" and sent["x-request-id"]


@pytest.mark.parametrize("token", ["", "   ", "change-me", "CHANGEME"])
def test_an_empty_or_placeholder_admin_token_is_refused(token: str) -> None:
    with pytest.raises(ConfigError, match="server.admin_token"):
        parse_config({"engines": [{"name": "a", "url": "http://a"}], "server": {"admin_token": token}})


def test_secrets_come_from_the_environment() -> None:
    data = {"engines": [{"name": "a", "url": "http://a"}], "server": {"api_keys": ["k-file-0123456789"]}}
    env = {"GATEWAY_ADMIN_TOKEN": "adm-env-0123456789", "GATEWAY_API_KEYS": "k-env-1, k-env-2,"}
    config = parse_config(with_environment(data, env))
    assert config.server.admin_token == "adm-env-0123456789"
    assert [k.key for k in config.server.api_keys] == ["k-file-0123456789", "k-env-1", "k-env-2"]
    # Empty variables (docker compose passes unset ones so) change nothing.
    assert parse_config(with_environment(data, {"GATEWAY_ADMIN_TOKEN": "", "GATEWAY_API_KEYS": ""})).server.admin_token is None


def test_the_published_api_is_the_clients_only(keyed: TestClient) -> None:
    paths = keyed.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/admin", "/debug"))]


def test_a_wrong_method_says_which_are_allowed(keyed: TestClient) -> None:
    resp = keyed.get("/v1/completions")
    assert resp.status_code == 405 and "POST" in resp.headers["allow"]
    assert resp.json()["error"]["message"]


def test_a_key_revoked_by_a_reload_is_refused_even_when_the_old_keys_identified_the_request() -> None:
    """The per-key cap asks the keys in force when the request arrives; a reload may swap them
    before the handler checks: the new keys must not trust the old keys' answer."""
    from starlette.requests import Request

    from gateway.api.auth import APIKeys
    from gateway.config import APIKeyConfig
    from gateway.errors import Unauthorized

    scope = {"type": "http", "headers": [(b"authorization", b"Bearer sk-old-key-0123456789")]}
    old = APIKeys([APIKeyConfig(key="sk-old-key-0123456789"), APIKeyConfig(key="sk-other-key-0123456789")])
    assert old.identify(scope) == 0
    revoked = APIKeys([APIKeyConfig(key="sk-other-key-0123456789")])
    with pytest.raises(Unauthorized):
        revoked.check(Request(scope))
