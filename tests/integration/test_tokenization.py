"""The gateway's local tokenization gives exactly the token ids the engine computes, as the
engine's own /render endpoints report them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.endpoints.registry import Endpoint
from gateway.tokenization.render import EngineRenderTokenizer
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


def test_render_tokenizer_asks_the_engine(engine_configs: list[dict[str, Any]]) -> None:
    endpoint = Endpoint(id=EngineId("e"), url=engine_configs[0]["url"])

    async def run() -> tuple[list[int] | None, list[int] | None]:
        async with httpx.AsyncClient() as client:
            tokenizer = EngineRenderTokenizer(client, lambda: endpoint)
            chat = await tokenizer.token_ids(CHAT_PATH, {"model": MODEL_NAME, **CHATS[1], "stream": True})
            completion = await tokenizer.token_ids(COMPLETIONS_PATH, {"model": MODEL_NAME, "prompt": "hello"})
            return chat, completion

    chat, completion = asyncio.run(run())
    assert chat == render(engine_configs[0]["url"], CHAT_PATH, CHATS[1])
    assert completion == render(engine_configs[0]["url"], COMPLETIONS_PATH, {"prompt": "hello"})
