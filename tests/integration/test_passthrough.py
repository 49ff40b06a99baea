"""The Responses API (with previous_response_id affinity) and the engines' other model-scoped
APIs, through the gateway in front of real CPU vLLM engines.

The generative engines run with VLLM_ENABLE_RESPONSES_API_STORE=1 (tests/conftest.py): each
keeps the responses it produced in its own memory and answers 404 for the others' ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import EMBED_MODEL_NAME, MODEL_NAME
from tests.harness import GatewayServer, gateway_config

pytestmark = pytest.mark.integration

ENGINE_HEADER = "x-gateway-engine"


@pytest.fixture(scope="module")
def gateway(engine_configs: list[dict[str, Any]]) -> Iterator[GatewayServer]:
    # Round robin: without affinity, consecutive turns of a conversation would alternate
    # between the two generative engines, and the one without the stored response says 404.
    config = gateway_config(engine_configs, routing={"policy": "round_robin"})
    with GatewayServer(config) as server:
        yield server


@pytest.fixture()
def client(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine_urls(engine_configs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["url"] for e in engine_configs}


@pytest.fixture(scope="module")
def generative(engine_urls: dict[str, str]) -> set[str]:
    return {name for name in engine_urls if name != "embed-0"}


# --- /v1/responses ---------------------------------------------------------------------------------


def test_responses_create(client: openai.OpenAI, generative: set[str]) -> None:
    raw = client.responses.with_raw_response.create(model=MODEL_NAME, input="Say something.", max_output_tokens=8)
    response = raw.parse()
    assert response.id.startswith("resp_")
    assert response.model == MODEL_NAME
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8
    assert response.output_text  # random weights: gibberish, but some
    assert raw.headers[ENGINE_HEADER] in generative


def test_responses_stream_and_continue_from_it(client: openai.OpenAI, generative: set[str]) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL_NAME, input="Count.", max_output_tokens=8, stream=True
    )
    engine = raw.headers[ENGINE_HEADER]
    events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert any(kind == "response.output_text.delta" for kind in kinds)
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.id == completed.response.id
    assert completed.response.usage is not None and 0 < completed.response.usage.output_tokens <= 8
    assert engine in generative
    # The id came out of the stream: the follow-up is pinned to the same engine, several times
    # over (round robin alone would move every other request).
    previous = completed.response.id
    for _ in range(3):
        follow = client.responses.with_raw_response.create(
            model=MODEL_NAME, input="Go on.", max_output_tokens=8, previous_response_id=previous, stream=True
        )
        assert follow.headers[ENGINE_HEADER] == engine
        last = list(follow.parse())[-1]
        assert last.type == "response.completed" and last.response.status in ("completed", "incomplete")
        previous = last.response.id


def test_previous_response_id_chains_stay_on_their_engine(client: openai.OpenAI, generative: set[str]) -> None:
    chains: list[tuple[str, str]] = []  # (engine, last response id) per chain
    for i in range(6):
        raw = client.responses.with_raw_response.create(
            model=MODEL_NAME, input=f"Conversation {i}: hello.", max_output_tokens=8
        )
        chains.append((raw.headers[ENGINE_HEADER], raw.parse().id))
    # The chains start on both engines, so landing on the wrong one is possible at every turn.
    assert {engine for engine, _ in chains} == generative
    for turn in range(3):
        # Each turn visits the chains in another order (rotated by turn + 1): round robin alone
        # would then send whole turns to the other engine of every chain.
        for j in range(len(chains)):
            i = (j + turn + 1) % len(chains)
            engine, previous = chains[i]
            raw = client.responses.with_raw_response.create(
                model=MODEL_NAME, input=f"Turn {turn}.", max_output_tokens=8, previous_response_id=previous
            )
            response = raw.parse()  # raises on an engine's 404 ("Response with id ... not found")
            assert raw.headers[ENGINE_HEADER] == engine, (i, turn)
            assert response.previous_response_id == previous
            chains[i] = (engine, response.id)
    # And each stored turn is retrievable through the gateway, from its engine.
    for engine, last in chains:
        raw_got = client.responses.with_raw_response.retrieve(last)
        assert raw_got.headers[ENGINE_HEADER] == engine
        assert raw_got.parse().id == last


def test_a_gateway_that_never_saw_a_response_knows_its_engine(
    client: openai.OpenAI, engine_configs: list[dict[str, Any]], generative: set[str]
) -> None:
    """Another worker, another replica, this gateway after a restart: the ids the gateway
    gives responses name their engine, so a follow-up needs no memory of the first request."""
    first = [client.responses.with_raw_response.create(model=MODEL_NAME, input=f"Hi {i}.", max_output_tokens=4)
             for i in range(4)]  # fmt: skip
    assert {raw.headers[ENGINE_HEADER] for raw in first} == generative
    with GatewayServer(gateway_config(engine_configs, routing={"policy": "round_robin"})) as other:
        fresh = openai.OpenAI(base_url=f"{other.url}/v1", api_key="unused", max_retries=0)
        for raw in first:
            previous = raw.parse().id
            assert previous.startswith("resp_gw")
            follow = fresh.responses.with_raw_response.create(
                model=MODEL_NAME, input="And then?", max_output_tokens=4, previous_response_id=previous
            )
            assert follow.headers[ENGINE_HEADER] == raw.headers[ENGINE_HEADER]
            assert follow.parse().previous_response_id == previous


def test_retrieve(client: openai.OpenAI) -> None:
    created = client.responses.create(model=MODEL_NAME, input="Remember me.", max_output_tokens=4)
    got = client.responses.retrieve(created.id)
    assert got.id == created.id
    assert got.output_text == created.output_text
    assert got.status == created.status


def test_unknown_response_id_is_openai_shaped_404(client: openai.OpenAI, gateway: GatewayServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve("resp_no-such-response")
    body = httpx.get(f"{gateway.url}/v1/responses/resp_no-such-response").json()
    assert body == {"error": {"message": "Response with id 'resp_no-such-response' not found.",
                              "type": "invalid_request_error", "param": "response_id",
                              "code": "response_not_found"}}  # fmt: skip
    assert info.value.status_code == 404


def test_responses_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="no-such-model", input="x")
    assert info.value.body is not None and info.value.body["code"] == "model_not_found"  # type: ignore[index]


# --- pass-through APIs -----------------------------------------------------------------------------


def test_tokenize_and_detokenize(gateway: GatewayServer, engine_urls: dict[str, str], generative: set[str]) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hello passthrough world"}
    direct = httpx.post(f"{engine_urls['engine-0']}/tokenize", json=body, timeout=30).json()
    resp = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=30)
    assert resp.status_code == 200 and resp.headers[ENGINE_HEADER] in generative
    assert resp.json()["tokens"] == direct["tokens"] and resp.json()["count"] == len(direct["tokens"]) > 3
    back = httpx.post(f"{gateway.url}/detokenize", json={"model": MODEL_NAME, "tokens": direct["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.headers[ENGINE_HEADER] in generative
    assert back.json()["prompt"].endswith("Hello passthrough world")


def test_body_without_model_is_400_with_two_models(gateway: GatewayServer) -> None:
    resp = httpx.post(f"{gateway.url}/tokenize", json={"prompt": "hi"}, timeout=30)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "model"


def test_anthropic_messages(gateway: GatewayServer, engine_urls: dict[str, str], generative: set[str]) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=120)
    raw = client.messages.with_raw_response.create(
        model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": "Hello!"}]
    )
    message = raw.parse()
    assert raw.headers[ENGINE_HEADER] in generative
    assert message.type == "message" and message.role == "assistant"
    assert 0 < message.usage.output_tokens <= 8
    count_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count my tokens, please."}]}
    direct = httpx.post(f"{engine_urls['engine-0']}/v1/messages/count_tokens", json=count_body, timeout=30)
    counted = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=count_body, timeout=30)
    assert counted.status_code == direct.status_code == 200
    assert counted.json()["input_tokens"] == direct.json()["input_tokens"] > 0


DOCUMENTS = ["A fox is a small wild animal.", "Cars are fast.", "The quick brown fox jumps."]
POOLING_BODIES: dict[str, dict[str, Any]] = {
    "/pooling": {"input": ["first text", "second text"]},
    "/classify": {"input": ["first text"]},
    "/score": {"queries": "What is a fox?", "documents": DOCUMENTS},
    "/v1/score": {"queries": "What is a fox?", "documents": DOCUMENTS},
    "/rerank": {"query": "What is a fox?", "documents": DOCUMENTS},
    "/v1/rerank": {"query": "What is a fox?", "documents": DOCUMENTS},
    "/v2/rerank": {"query": "What is a fox?", "documents": DOCUMENTS},
}


def meaningful(body: dict[str, Any]) -> list[float]:
    """The numbers of an answer that come from the engine's computation (not ids or time):
    rerank's (index, relevance score) pairs, score's and pooling's data, flattened."""
    numbers: list[float] = []

    def flatten(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                flatten(item)
        else:
            numbers.append(float(value))

    for result in body.get("results", []):  # rerank
        flatten([result["index"], result["relevance_score"]])
    for item in body.get("data", []):  # score, pooling, classify
        flatten([item["index"], item.get("score", item.get("data", item.get("probs", [])))])
    return numbers


@pytest.mark.parametrize("path", list(POOLING_BODIES))
def test_pooling_apis_answer_as_the_engine_does(gateway: GatewayServer, engine_urls: dict[str, str],
                                                path: str) -> None:  # fmt: skip
    body = {"model": EMBED_MODEL_NAME, **POOLING_BODIES[path]}
    direct = httpx.post(f"{engine_urls['embed-0']}{path}", json=body, timeout=60)
    resp = httpx.post(f"{gateway.url}{path}", json=body, timeout=60)
    assert resp.status_code == direct.status_code, resp.text
    if direct.status_code == 200:
        assert resp.headers[ENGINE_HEADER] == "embed-0"
        expected = meaningful(direct.json())
        assert len(expected) >= 2 * len(body.get("documents", body.get("input")))
        assert meaningful(resp.json()) == pytest.approx(expected, rel=1e-3, abs=1e-5)
    elif direct.json() == {"detail": "Not Found"}:
        # The engine has no such API (FastAPI's answer): the gateway says so, OpenAI-shaped.
        assert resp.json() == {"error": {"message": f"The engine serving model `{EMBED_MODEL_NAME}` has no "
                                                   f"{path} API.", "type": "invalid_request_error",
                                         "param": None, "code": "unsupported_endpoint"}}  # fmt: skip
    else:
        assert resp.content == direct.content  # the engine's own error, untouched


def test_embed_engine_serves_pooling_score_and_rerank(gateway: GatewayServer) -> None:
    """What the tiny embedding engine serves (the test above only compares with the engine)."""
    served = {
        path: httpx.post(f"{gateway.url}{path}", json={"model": EMBED_MODEL_NAME, **body}, timeout=60).status_code
        for path, body in POOLING_BODIES.items()
    }
    assert served == {"/pooling": 200, "/classify": 404, "/score": 200, "/v1/score": 200, "/rerank": 200,
                      "/v1/rerank": 200, "/v2/rerank": 200}  # fmt: skip


# --- what nobody serves ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/no-such-api"), ("GET", "/no/such/path")])
def test_unknown_path_is_openai_shaped_404(gateway: GatewayServer, method: str, path: str) -> None:
    resp = httpx.request(method, f"{gateway.url}{path}", json={"model": MODEL_NAME})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]


@pytest.mark.parametrize("path", ["/tokenize", "/v1/messages", "/rerank"])
def test_passthrough_unknown_model_is_openai_shaped_404(gateway: GatewayServer, path: str) -> None:
    resp = httpx.post(f"{gateway.url}{path}", json={"model": "no-such-model", "prompt": "x"}, timeout=30)
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "The model `no-such-model` does not exist.",
                                     "type": "invalid_request_error", "param": "model",
                                     "code": "model_not_found"}}  # fmt: skip
