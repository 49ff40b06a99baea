"""The gateway's local tokenization gives exactly the token ids the engine computes, as the
engine's own /render endpoints report them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.endpoints.registry import Endpoint
from gateway.tokenization.engine import EngineTokenizer
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH, HFPromptTokenizer
from gateway.types import EngineId
from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip

CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello there!"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer, with\nnew lines\n\nand   spaces."},
        {"role": "user", "content": "Ünïcödé, 漢字, emoji 🚀 and tabs\tok?"},
    ]},  # fmt: skip
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                               {"type": "text", "text": "part two"}]}]},  # fmt: skip
    # tool_choice "none": the engines run without a tool-call parser, but still render tools.
    {"messages": [{"role": "user", "content": "What's the weather in Paris?"}], "tools": TOOLS, "tool_choice": "none"},
    {"messages": [{"role": "user", "content": "Complete this:"}, {"role": "assistant", "content": "Once upon"}],
     "add_generation_prompt": False, "continue_final_message": True},  # fmt: skip
    {"messages": [{"role": "user", "content": "def f(x):\n    return x ** 2  # square\n" * 20}]},
]
COMPLETIONS: list[Any] = [
    "The quick brown fox",
    " leading space and trailing space ",
    "Ünïcödé, 漢字, emoji 🚀\n\n\ttabs",
    "x = [i * 2 for i in range(10)]\nprint(x)\n" * 30,
    [0, 17, 99, 1234, 4000],
]


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> HFPromptTokenizer:
    return HFPromptTokenizer(tiny_model_dir)


def render(url: str, path: str, body: dict[str, Any]) -> list[int]:
    resp = httpx.post(f"{url}{path}/render", json={"model": MODEL_NAME, **body}, timeout=30)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    return list((data[0] if isinstance(data, list) else data)["token_ids"])


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_chat_tokens_equal_the_engines(local: HFPromptTokenizer, engine_configs: list[dict[str, Any]], index: int) -> None:
    body = CHATS[index]
    expected = render(engine_configs[0]["url"], CHAT_PATH, body)
    assert local.token_ids_sync(CHAT_PATH, {"model": MODEL_NAME, **body}) == expected


@pytest.mark.parametrize("index", range(len(COMPLETIONS)))
def test_completion_tokens_equal_the_engines(
    local: HFPromptTokenizer, engine_configs: list[dict[str, Any]], index: int
) -> None:
    body = {"prompt": COMPLETIONS[index]}
    expected = render(engine_configs[0]["url"], COMPLETIONS_PATH, body)
    assert local.token_ids_sync(COMPLETIONS_PATH, {"model": MODEL_NAME, **body}) == expected


def test_engine_tokenizer_uses_render_where_served_and_tokenize_where_not(engine_configs: list[dict[str, Any]]) -> None:
    """These engines serve /render (--enable-scale-out); a stock engine refuses it with 403, and
    then /tokenize, which every vLLM server serves, must give the same ids."""
    endpoint = Endpoint(id=EngineId("e"), url=engine_configs[0]["url"])
    chat = {"model": MODEL_NAME, **CHATS[2], "stream": True}
    completion = {"model": MODEL_NAME, "prompt": COMPLETIONS[2]}
    asked: list[str] = []

    async def refuse_render(request: httpx.Request) -> None:
        asked.append(request.url.path)

    async def run() -> list[list[int] | None]:
        results = []
        async with httpx.AsyncClient() as client:
            results.append(await EngineTokenizer(client, lambda model: endpoint).token_ids(MODEL_NAME, CHAT_PATH, chat))
        async with httpx.AsyncClient(event_hooks={"request": [refuse_render]}) as client:
            stock = EngineTokenizer(client, lambda model: endpoint)
            stock._renders[endpoint.id] = False  # as after a 403 from a stock engine
            results.append(await stock.token_ids(MODEL_NAME, CHAT_PATH, chat))
            results.append(await stock.token_ids(MODEL_NAME, COMPLETIONS_PATH, completion))
        return results

    by_render, by_tokenize, completion_ids = asyncio.run(run())
    assert by_render == by_tokenize == render(engine_configs[0]["url"], CHAT_PATH, CHATS[2])
    assert completion_ids == render(engine_configs[0]["url"], COMPLETIONS_PATH, {"prompt": COMPLETIONS[2]})
    assert asked == ["/tokenize", "/tokenize"]
