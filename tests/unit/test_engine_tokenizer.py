"""Token ids from the engines: /render where an engine serves it, /tokenize where it does not,
learned per engine; the request shapes each tokenizer reads."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway.endpoints.registry import Endpoint
from gateway.tokenization.engine import EngineTokenizer
from gateway.tokenization.prompt import ChatPrompt, TextPrompt, TokenPrompt, prompt_of
from gateway.tokenization.tokenizer import TokenizationFailed
from gateway.types import EngineId

STOCK = {"a"}  # engines that refuse /render, as `vllm serve` without --enable-scale-out does


def engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("model") == "unknown":
        return httpx.Response(404, json={"error": {"message": "The model `unknown` does not exist."}})
    if request.url.path.endswith("/render"):
        if request.url.host in STOCK:
            return httpx.Response(403, json={"error": {"message": "Scale-out endpoints are disabled."}})
        return httpx.Response(200, json={"token_ids": [1, 2, 3]})
    assert request.url.path == "/tokenize"
    assert "stream" not in body and "max_tokens" not in body  # only what /tokenize takes
    return httpx.Response(200, json={"tokens": [7, 8], "count": 2})


def tokenize_all(requests: list[tuple[str, str, dict[str, Any]]]) -> tuple[list[Any], list[str]]:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.host}{request.url.path}")
        return engine(request)

    async def go() -> list[Any]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            tokenizer = EngineTokenizer(client, lambda model: Endpoint(EngineId(model[0]), f"http://{model[0]}"))
            results: list[Any] = []
            for model, path, body in requests:
                try:
                    results.append(await tokenizer.token_ids(model, path, {"model": model, **body}))
                except TokenizationFailed as exc:
                    results.append(str(exc))
            return results

    return asyncio.run(go()), asked


CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}


def test_a_stock_engine_is_asked_render_once_then_tokenize() -> None:
    results, asked = tokenize_all([("a", "/v1/chat/completions", CHAT)] * 3)
    assert results == [[7, 8]] * 3
    assert asked == ["a/v1/chat/completions/render", "a/tokenize", "a/tokenize", "a/tokenize"]


def test_render_is_used_where_served_whatever_another_engine_does() -> None:
    results, asked = tokenize_all([("a", "/v1/chat/completions", CHAT), ("b", "/v1/chat/completions", CHAT)])
    assert results == [[7, 8], [1, 2, 3]]
    assert asked[-1] == "b/v1/chat/completions/render"


def test_a_failure_concerns_that_request_only() -> None:
    results, asked = tokenize_all([("unknown", "/v1/completions", {"prompt": "x"}), ("b", "/v1/completions", {"prompt": "x"})])
    assert isinstance(results[0], str) and "404" in results[0]
    assert results[1] == [1, 2, 3]


def test_token_id_prompts_and_other_apis_ask_nobody() -> None:
    results, asked = tokenize_all([("a", "/v1/completions", {"prompt": [5, 6]}), ("a", "/v1/embeddings", {"input": "x"})])
    assert results == [[5, 6], None] and asked == []


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/completions", {"prompt": "hi"}, TextPrompt("hi")),
        ("/v1/completions", {"prompt": ["first", "second"]}, TextPrompt("first")),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, TokenPrompt([1, 2])),  # a batch: the first decides
        ("/v1/completions", {"prompt": [1, True]}, None),
        ("/v1/completions", {"prompt": [3, 4]}, TokenPrompt([3, 4])),
        ("/v1/chat/completions", {"messages": []}, None),
        ("/v1/chat/completions", {"messages": 5}, None),
        ("/v1/chat/completions",
         {"messages": [{"role": "assistant", "content": "Once"}], "continue_final_message": True},
         ChatPrompt([{"role": "assistant", "content": "Once"}], add_generation_prompt=False, continue_final_message=True)),
        ("/v1/responses", {"input": "hi", "instructions": "Be brief."},
         ChatPrompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])),
        ("/v1/responses",
         {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}]},
                    {"type": "function_call_output", "call_id": "c", "output": "x"}],
          "tools": [{"type": "function", "name": "f", "parameters": {}}]},
         ChatPrompt([{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
        ("/v1/embeddings", {"input": "x"}, None),
    ],
)  # fmt: skip
def test_the_prompt_of_each_api(path: str, body: dict[str, Any], expected: object) -> None:
    assert prompt_of(path, body) == expected
