from __future__ import annotations

import asyncio

import httpx

from gateway.endpoints.registry import Endpoint
from gateway.tokenization.render import EngineRenderTokenizer
from gateway.types import EngineId


def run_twice(status: int, payload: object) -> tuple[list[list[int] | None], int]:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(status, json=payload)

    async def go() -> list[list[int] | None]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            tokenizer = EngineRenderTokenizer(client, lambda: Endpoint(id=EngineId("e"), url="http://e"))
            body = {"model": "m", "prompt": "hi", "stream": True}
            return [await tokenizer.token_ids("/v1/completions", body) for _ in range(2)]

    return asyncio.run(go()), len(calls)


def test_render_returns_the_engines_token_ids() -> None:
    results, calls = run_twice(200, [{"token_ids": [0, 5, 6]}])
    assert results == [[0, 5, 6], [0, 5, 6]] and calls == 2


def test_an_engine_refusing_render_is_not_asked_again_for_a_while() -> None:
    results, calls = run_twice(403, {"error": {"message": "Scale-out endpoints are disabled."}})
    assert results == [None, None]
    assert calls == 1  # the second request pays no extra hop


def test_embeddings_are_not_rendered() -> None:
    async def go() -> list[int] | None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as client:
            tokenizer = EngineRenderTokenizer(client, lambda: Endpoint(id=EngineId("e"), url="http://e"))
            return await tokenizer.token_ids("/v1/embeddings", {"model": "m", "input": "x"})

    assert asyncio.run(go()) is None
