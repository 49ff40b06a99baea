"""Responses API affinity and the pass-through routes, against fake engines (MockTransport).

Each fake engine keeps the responses it produced in its own memory, as vLLM does with
VLLM_ENABLE_RESPONSES_API_STORE=1, and answers 404 for any other id.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.config import parse_config
from gateway.proxy.paths import PASSTHROUGH_PATHS

Handler = Callable[[httpx.Request], httpx.Response]


def engine_json(status: int, obj: object) -> httpx.Response:
    data = json.dumps(obj).encode()
    headers = {"content-type": "application/json", "content-length": str(len(data))}
    return httpx.Response(status, stream=httpx.ByteStream(data), headers=headers)


def not_found(response_id: str) -> httpx.Response:
    message = f"Response with id '{response_id}' not found."
    return engine_json(404, {"error": {"message": message, "type": "invalid_request_error", "param": "response_id",
                                       "code": 404}})  # fmt: skip


class FakeEngines:
    """Engines named by host; `models[host]` is what each serves."""

    def __init__(self, models: dict[str, list[str]]) -> None:
        self.models = models
        self.stored: dict[str, set[str]] = {host: set() for host in models}
        self.calls: list[tuple[str, str, str]] = []  # (host, method, path with query)
        self.bodies: list[bytes] = []
        self.override: dict[str, Handler] = {}
        self._ids = itertools.count(1)

    def handler(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m, "object": "model"}
                                                                        for m in self.models[host]]})  # fmt: skip
        if path in ("/metrics", "/kv_event_sources") or path.endswith("/render"):
            return httpx.Response(404)
        if path == "/tokenize" and b"client-call" not in request.content:
            return httpx.Response(404)  # the gateway's own tokenizer checks: not part of these tests
        query = request.url.query.decode()
        self.calls.append((host, request.method, path + (f"?{query}" if query else "")))
        self.bodies.append(request.content)
        if host in self.override:
            return self.override[host](request)
        if path == "/v1/responses":
            return self.create(host, json.loads(request.content))
        if path.startswith("/v1/responses/"):
            response_id = path.split("/")[3]
            if response_id not in self.stored[host]:
                return not_found(response_id)
            if path.endswith("/cancel"):
                return engine_json(400, {"error": {"message": "Cannot cancel a synchronous response.",
                                                   "type": "invalid_request_error"}})  # fmt: skip
            return engine_json(200, {"id": response_id, "object": "response", "status": "completed"})
        return engine_json(200, {"served_by": host, "path": path})

    def create(self, host: str, body: dict[str, Any]) -> httpx.Response:
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored[host]:
            return not_found(previous)
        response_id = f"resp_{host}{next(self._ids)}"
        self.stored[host].add(response_id)
        usage = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}  # fmt: skip
        response = {"id": response_id, "object": "response", "status": "completed", "output": [], "usage": usage}
        if not body.get("stream"):
            return engine_json(200, response)
        events = [
            ("response.created", {"type": "response.created", "sequence_number": 0,
                                  "response": {**response, "status": "in_progress", "usage": None}}),
            ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1,
                                            "delta": "hi", "item_id": "msg_1"}),
            ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": response}),
        ]  # fmt: skip
        data = b"".join(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode() for kind, payload in events)
        return httpx.Response(200, stream=httpx.ByteStream(data), headers={"content-type": "text/event-stream"})

    def engines_called(self, path_prefix: str) -> list[str]:
        return [host for host, _, path in self.calls if path.startswith(path_prefix)]


def make_client(engines: FakeEngines, **sections: Any) -> TestClient:
    config = parse_config({
        "engines": [{"name": host, "url": f"http://{host}"} for host in engines.models],
        "routing": {"policy": "round_robin"},
        "proxy": {"max_retries": 2},
        "health": {"interval_s": 600},
        **sections,
    })  # fmt: skip
    return TestClient(build_app(config, transport=httpx.MockTransport(engines.handler)))


@pytest.fixture()
def engines() -> FakeEngines:
    return FakeEngines({"a": ["m"], "b": ["m"]})


@pytest.fixture()
def client(engines: FakeEngines) -> Iterator[TestClient]:
    with make_client(engines) as test_client:
        yield test_client


def create(client: TestClient, previous: str | None = None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": "m", "input": "hello", **extra}
    if previous is not None:
        body["previous_response_id"] = previous
    return client.post("/v1/responses", json=body)


# --- previous_response_id ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_follow_ups_go_to_the_engine_that_stored_the_response(client: TestClient, engines: FakeEngines,
                                                              stream: bool) -> None:  # fmt: skip
    for _chain in range(3):
        first = create(client, stream=stream)
        assert first.status_code == 200
        engine = first.headers["x-gateway-engine"]
        previous = _response_id(first, stream)
        for _turn in range(3):
            # Round robin alone would alternate, and the other engine answers 404.
            follow_up = create(client, previous=previous, stream=stream)
            assert follow_up.status_code == 200, follow_up.text
            assert follow_up.headers["x-gateway-engine"] == engine
            previous = _response_id(follow_up, stream)
            assert previous in engines.stored[engine]


def _response_id(resp: httpx.Response, stream: bool) -> str:
    return _created_id(resp.text) if stream else str(resp.json()["id"])


def _created_id(sse: str) -> str:
    for line in sse.splitlines():
        if line.startswith("data:") and '"response.created"' in line:
            return str(json.loads(line[5:])["response"]["id"])
    raise AssertionError(f"no response.created event in {sse!r}")


def test_streamed_bytes_pass_through_unchanged(client: TestClient, engines: FakeEngines) -> None:
    resp = create(client, stream=True)
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.count("event: response.") == 3
    assert _created_id(resp.text) in engines.stored[resp.headers["x-gateway-engine"]]


def test_unknown_previous_response_id_is_routed_normally(client: TestClient, engines: FakeEngines) -> None:
    seen = {create(client, previous="resp_nobody-knows").headers["x-gateway-engine"] for _ in range(4)}
    assert seen == {"a", "b"}  # round robin as usual; each engine answered its own 404
    assert create(client, previous="resp_nobody-knows").status_code == 404


@pytest.mark.parametrize("failure", ["status_503", "connect_error"])
def test_pinned_request_is_not_retried_on_other_engines(client: TestClient, engines: FakeEngines,
                                                        failure: str) -> None:  # fmt: skip
    first = create(client)
    owner = first.headers["x-gateway-engine"]

    def fail(request: httpx.Request) -> httpx.Response:
        if failure == "connect_error":
            raise httpx.ConnectError("connection refused", request=request)
        return engine_json(503, {"error": {"message": "overloaded"}})

    engines.override[owner] = fail
    engines.calls.clear()
    resp = create(client, previous=first.json()["id"])
    assert resp.status_code == (503 if failure == "status_503" else 502)
    assert engines.engines_called("/v1/responses") == [owner]
    # Without a previous_response_id the same failure is retried elsewhere.
    engines.calls.clear()
    resp = create(client)
    assert resp.status_code == 200
    assert resp.headers["x-gateway-engine"] != owner


def test_pinned_engine_out_of_rotation_routes_normally(client: TestClient, engines: FakeEngines) -> None:
    first = create(client)
    owner = first.headers["x-gateway-engine"]
    endpoint = client.app.state.runtime.registry.get(owner)  # type: ignore[attr-defined]
    endpoint.draining = True
    resp = create(client, previous=first.json()["id"])
    assert resp.headers["x-gateway-engine"] != owner
    assert resp.status_code == 404  # that engine does not hold it: its own answer


def test_model_may_be_left_out_when_the_engines_serve_one_model(client: TestClient) -> None:
    resp = client.post("/v1/responses", json={"input": "hi"})
    assert resp.status_code == 200
    assert resp.headers["x-gateway-engine"] in {"a", "b"}


# --- GET /v1/responses/{id} and cancel -----------------------------------------------------------


def test_retrieve_and_cancel_go_to_the_owner(client: TestClient, engines: FakeEngines) -> None:
    for _ in range(2):
        first = create(client)
        owner, response_id = first.headers["x-gateway-engine"], first.json()["id"]
        engines.calls.clear()
        got = client.get(f"/v1/responses/{response_id}", params={"stream": "false", "starting_after": "2"})
        assert got.status_code == 200 and got.json()["id"] == response_id
        assert got.headers["x-gateway-engine"] == owner
        cancelled = client.post(f"/v1/responses/{response_id}/cancel")
        assert cancelled.status_code == 400  # the owner's answer: "Cannot cancel a synchronous response."
        assert "synchronous" in cancelled.json()["error"]["message"]
        assert engines.calls == [
            (owner, "GET", f"/v1/responses/{response_id}?stream=false&starting_after=2"),
            (owner, "POST", f"/v1/responses/{response_id}/cancel"),
        ]


def test_unknown_id_is_looked_for_on_every_engine_and_then_remembered(client: TestClient,
                                                                      engines: FakeEngines) -> None:  # fmt: skip
    engines.stored["b"].add("resp_made-before-a-restart")
    got = client.get("/v1/responses/resp_made-before-a-restart")
    assert got.status_code == 200 and got.headers["x-gateway-engine"] == "b"
    assert engines.engines_called("/v1/responses/") == ["a", "b"]
    engines.calls.clear()
    assert client.get("/v1/responses/resp_made-before-a-restart").status_code == 200
    assert engines.engines_called("/v1/responses/") == ["b"]
    # And the follow-up is pinned to it too.
    assert create(client, previous="resp_made-before-a-restart").headers["x-gateway-engine"] == "b"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_id_no_engine_holds_is_an_openai_shaped_404(client: TestClient, engines: FakeEngines, method: str) -> None:
    path = "/v1/responses/resp_missing" + ("/cancel" if method == "POST" else "")
    resp = client.request(method, path)
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "Response with id 'resp_missing' not found.",
                                     "type": "invalid_request_error", "param": "response_id",
                                     "code": "response_not_found"}}  # fmt: skip
    assert sorted(engines.engines_called("/v1/responses/")) == ["a", "b"]


def test_owner_out_of_reach_is_503(client: TestClient, engines: FakeEngines) -> None:
    first = create(client)
    owner = first.headers["x-gateway-engine"]
    client.app.state.runtime.registry.get(owner).healthy = False  # type: ignore[attr-defined]
    resp = client.get(f"/v1/responses/{first.json()['id']}")
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_healthy_engine"
    assert owner in resp.json()["error"]["message"]


# --- pass-through APIs ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PASSTHROUGH_PATHS)
def test_every_passthrough_path_reaches_an_engine_of_the_model(path: str) -> None:
    engines = FakeEngines({"a": ["m"], "b": ["m"], "e": ["embed"]})
    with make_client(engines) as client:
        body = {"model": "embed", "input": "client-call", "field": [1, 2]}
        resp = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert resp.status_code == 200
        assert resp.json() == {"served_by": "e", "path": path}
        assert resp.headers["x-gateway-engine"] == "e"
        assert json.loads(engines.bodies[-1]) == body


def test_passthrough_is_not_tokenized_but_responses_are(engines: FakeEngines) -> None:
    with make_client(engines, routing={"policy": "prefix"}) as client:
        prefix = client.app.state.runtime.generation.prefix  # type: ignore[attr-defined]
        annotated: list[str] = []
        original = prefix.annotate

        async def spy(request: Any) -> None:
            annotated.append(request.api_path)
            await original(request)

        prefix.annotate = spy
        assert client.post("/tokenize", json={"model": "m", "prompt": "client-call"}).status_code == 200
        assert client.post("/v1/messages", json={"model": "m", "max_tokens": 4, "messages": []}).status_code == 200
        assert create(client).status_code == 200
        assert annotated == ["/v1/responses"]


def test_body_without_model_needs_a_single_model_fleet() -> None:
    one = FakeEngines({"a": ["m"], "b": ["m"]})
    with make_client(one) as client:
        resp = client.post("/tokenize", json={"prompt": "client-call"})
        assert resp.status_code == 200 and resp.headers["x-gateway-engine"] in {"a", "b"}
        assert json.loads(one.bodies[-1]) == {"prompt": "client-call"}  # forwarded as sent
    two = FakeEngines({"a": ["m"], "e": ["embed"]})
    with make_client(two) as client:
        resp = client.post("/tokenize", json={"prompt": "client-call"})
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "model"
        assert two.calls == []
        # Chat completions keep requiring it, whatever the fleet.
    with make_client(one) as client:
        assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400


def test_passthrough_unknown_model_is_404(client: TestClient, engines: FakeEngines) -> None:
    resp = client.post("/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert engines.calls == []


def test_api_the_engine_lacks_is_the_gateways_openai_shaped_404(client: TestClient, engines: FakeEngines) -> None:
    engines.override["a"] = engines.override["b"] = lambda r: engine_json(404, {"detail": "Not Found"})
    resp = client.post("/classify", json={"model": "m", "input": ["x"]})
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "The engine serving model `m` has no /classify API.",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "unsupported_endpoint"}}  # fmt: skip
    assert len(engines.calls) == 1  # not retried: a 404 is an answer


def test_engine_404_of_its_own_passes_through_byte_for_byte(client: TestClient, engines: FakeEngines) -> None:
    resp = create(client, previous="resp_unknown")
    assert resp.status_code == 404
    assert resp.content == not_found("resp_unknown").read()
    assert resp.headers["x-gateway-engine"] in {"a", "b"}


def test_passthrough_503_is_retried_on_another_engine(client: TestClient, engines: FakeEngines) -> None:
    engines.override["a"] = lambda r: engine_json(503, {"error": {"message": "overloaded"}})
    for _ in range(2):  # round robin: one of the two starts on a
        resp = client.post("/tokenize", json={"model": "m", "prompt": "client-call"})
        assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == "b"
    assert "a" in engines.engines_called("/tokenize")
