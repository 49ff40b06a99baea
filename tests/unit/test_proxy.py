"""The proxy against fake engines (httpx MockTransport): retries, pass-through, error mapping."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import parse_config

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}


class FakeFleet:
    """Engines a, b, c at http://a etc.; `behaviour[name]` answers inference calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.behaviour: dict[str, Callable[[httpx.Request], httpx.Response]] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        if request.url.path == "/kv_event_sources":
            return httpx.Response(200, json={})
        if request.url.path.endswith("/render"):
            return httpx.Response(403, json={"error": {"message": "Scale-out endpoints are disabled."}})
        self.calls.append(host)
        return self.behaviour.get(host, ok)(request)


def engine_json(status: int, obj: object, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response whose body is still a stream, as a real engine's is."""
    data = json.dumps(obj).encode()
    headers = {"content-type": "application/json", "content-length": str(len(data)), **(headers or {})}
    return httpx.Response(status, stream=httpx.ByteStream(data), headers=headers)


def ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return engine_json(200, {"object": "text_completion", "model": body["model"], "choices": []},
                       {"server": "engine", "x-engine-extra": "kept"})  # fmt: skip


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture()
def fleet() -> FakeFleet:
    return FakeFleet()


@pytest.fixture()
def client(fleet: FakeFleet) -> Iterator[TestClient]:
    config = parse_config(
        {
            "engines": [{"name": n, "url": f"http://{n}"} for n in "abc"],
            "routing": {"policy": "round_robin"},
            "proxy": {"max_retries": 2, "max_body_bytes": 4096},
            "health": {"interval_s": 600},
        }
    )
    app = build_app(config, transport=httpx.MockTransport(fleet.handler))
    with TestClient(app) as test_client:
        yield test_client


def complete(client: TestClient, **extra: object) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "m", "prompt": "hi", **extra})


def test_passes_response_through_with_gateway_headers(client: TestClient, fleet: FakeFleet) -> None:
    resp = complete(client)
    assert resp.status_code == 200
    assert resp.headers["x-gateway-engine"] == "a"
    assert resp.headers["x-engine-extra"] == "kept"
    assert resp.headers.get("server") != "engine"  # hop-local header not copied
    assert resp.headers["x-request-id"].startswith("gw-")


def test_connect_error_retries_on_another_engine(client: TestClient, fleet: FakeFleet) -> None:
    fleet.behaviour["a"] = refuse
    resp = complete(client)
    assert resp.status_code == 200
    assert resp.headers["x-gateway-engine"] in {"b", "c"}
    assert fleet.calls == ["a", resp.headers["x-gateway-engine"]]
    # a is ejected: the next requests do not try it again.
    complete(client)
    complete(client)
    assert "a" not in fleet.calls[2:]


def test_503_from_engine_is_retried_but_400_is_not(client: TestClient, fleet: FakeFleet) -> None:
    fleet.behaviour["a"] = lambda r: engine_json(503, {"error": {"message": "overloaded"}})
    assert complete(client).headers["x-gateway-engine"] in {"b", "c"}
    assert fleet.calls[0] == "a" and len(fleet.calls) == 2
    for name in "abc":
        fleet.behaviour[name] = lambda r: engine_json(400, {"error": {"message": "bad max_tokens", "type": "BadRequestError"}})
    fleet.calls.clear()
    resp = complete(client)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "bad max_tokens"
    assert len(fleet.calls) == 1


def test_all_engines_failing_gives_502_after_bounded_retries(client: TestClient, fleet: FakeFleet) -> None:
    for name in "abc":
        fleet.behaviour[name] = refuse
    resp = complete(client)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "engine_unreachable"
    assert len(fleet.calls) == 3  # 1 try + max_retries


def test_read_timeout_is_504_and_not_retried(client: TestClient, fleet: FakeFleet) -> None:
    """The socket's read timeout (`read_timeout_s`) on a non-streamed request: its client waited
    that long already. The engine is ejected all the same."""
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    fleet.behaviour["a"] = slow
    resp = complete(client)
    assert resp.status_code == 504
    assert resp.json()["error"]["type"] == "timeout"
    assert fleet.calls == ["a"]
    assert {complete(client).headers["x-gateway-engine"] for _ in range(4)} == {"b", "c"}


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"{", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"prompt": "x"}', 400, "model"),
        (b'{"model": 7}', 400, "model"),
        (b'{"model": "unknown"}', 404, "does not exist"),
        (b'{"model": "m", "prompt": "' + b"x" * 5000 + b'"}', 413, "exceeds"),
    ],
)
def test_bad_input_gets_openai_errors(client: TestClient, content: bytes, status: int, fragment: str) -> None:
    resp = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert fragment in error["message"]
    assert error["type"] and "code" in error


def test_unknown_route_is_openai_shaped_404(client: TestClient) -> None:
    resp = client.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"


def test_models_are_the_union_of_available_engines(client: TestClient) -> None:
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["m"]


def test_admin_api_needs_token_and_drains(fleet: FakeFleet) -> None:
    config = parse_config({"engines": [{"name": n, "url": f"http://{n}"} for n in "ab"],
                           "server": {"admin_token": "s3cret"}, "routing": {"policy": "round_robin"}})  # fmt: skip
    with TestClient(build_app(config, transport=httpx.MockTransport(fleet.handler))) as client:
        assert client.post("/admin/engines/a/drain").status_code == 401
        resp = client.post("/admin/engines/a/drain", headers={"authorization": "Bearer s3cret"})
        assert resp.status_code == 200 and resp.json()["draining"] is True
        assert {complete(client).headers["x-gateway-engine"] for _ in range(4)} == {"b"}
        client.post("/admin/engines/a/undrain", headers={"authorization": "Bearer s3cret"})
        assert {complete(client).headers["x-gateway-engine"] for _ in range(4)} == {"a", "b"}
