"""Prompt → token ids, exactly as the engine will compute them.

`HFPromptTokenizer` loads the model's Hugging Face tokenizer and chat template locally and
mirrors vLLM's preprocessing: chat requests are rendered with the template (tools, generation
prompt, template kwargs) to text and encoded without adding special tokens (the template has
them); completion prompts are encoded with special tokens. Long prompts are tokenized in a
worker thread so the event loop keeps serving other requests (measured in
bench/tokenize_latency.py). Integration tests prove equality with the engine's /render.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class PromptTokenizer(Protocol):
    async def token_ids(self, api_path: str, body: dict[str, Any]) -> list[int] | None:
        """Token ids of the prompt, or None when this request has no routable prompt."""
        ...


class HFPromptTokenizer:
    def __init__(
        self,
        tokenizer_dir: str | Path,
        *,
        executor: Executor | None = None,
        offload_min_chars: int = 2048,
    ) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self._executor = executor or ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._offload_min_chars = offload_min_chars

    async def token_ids(self, api_path: str, body: dict[str, Any]) -> list[int] | None:
        if _prompt_chars(body) < self._offload_min_chars:
            return self.token_ids_sync(api_path, body)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.token_ids_sync, api_path, body)

    def token_ids_sync(self, api_path: str, body: dict[str, Any]) -> list[int] | None:
        try:
            if api_path == CHAT_PATH:
                return self._chat(body)
            if api_path == COMPLETIONS_PATH:
                return self._completion(body.get("prompt"))
        except Exception as exc:  # a prompt we cannot render: route without prefix knowledge
            logger.debug("cannot tokenize request locally: %s", exc)
        return None

    def _chat(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        kwargs = dict(body.get("chat_template_kwargs") or {})
        continue_final = bool(body.get("continue_final_message", False))
        text = self._tokenizer.apply_chat_template(
            messages,
            tools=body.get("tools"),
            add_generation_prompt=bool(body.get("add_generation_prompt", True)) and not continue_final,
            continue_final_message=continue_final,
            tokenize=False,
            **kwargs,
        )
        add_special = bool(body.get("add_special_tokens", False))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def _completion(self, prompt: Any) -> list[int] | None:
        # A batch routes as one request: its first prompt decides.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _prompt_chars(body: dict[str, Any]) -> int:
    """A cheap size estimate that decides inline vs worker-thread tokenization."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return len(prompt) * 4  # token ids or several strings
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return total
