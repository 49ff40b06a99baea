"""What of a request is the prompt: one normalized shape for every tokenizer.

Chat completions and the Responses API render messages with the model's chat template;
completions carry text or token ids. Both the local tokenizer and the engines' `/tokenize`
take these shapes, so the two paths cannot drift in what they read from a body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.proxy.paths import RESPONSES_PATH

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    messages: list[Any]
    tools: list[Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def tokenize_body(self, model: str) -> dict[str, Any]:
        """The request vLLM's `/tokenize` takes for this chat (its TokenizeChatRequest)."""
        body: dict[str, Any] = {
            "model": model,
            "messages": self.messages,
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "add_special_tokens": self.add_special_tokens,
        }
        if self.tools is not None:
            body["tools"] = self.tools
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        return body


@dataclass(frozen=True, slots=True)
class TextPrompt:
    text: str

    def tokenize_body(self, model: str) -> dict[str, Any]:
        return {"model": model, "prompt": self.text, "add_special_tokens": True}


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    token_ids: list[int]


Prompt = ChatPrompt | TextPrompt | TokenPrompt


def prompt_of(api_path: str, body: dict[str, Any]) -> Prompt | None:
    """The prompt of a request to `api_path`, or None when it has none the gateway can route by."""
    if api_path == CHAT_PATH:
        return _chat(body)
    if api_path == COMPLETIONS_PATH:
        return _completion(body.get("prompt"))
    if api_path == RESPONSES_PATH:
        return _responses(body)
    return None


def _chat(body: dict[str, Any]) -> ChatPrompt | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    kwargs = body.get("chat_template_kwargs")
    if body.get("chat_template") is not None or (isinstance(kwargs, dict) and "chat_template" in kwargs):
        # A client's own template (where the gateway allows them) is never run here: it is
        # code, and the request is routed without prefix knowledge.
        return None
    tools = body.get("tools")
    continue_final = bool(body.get("continue_final_message", False))
    return ChatPrompt(
        messages=messages,
        tools=tools if isinstance(tools, list) else None,
        # vLLM: a continued final message has no generation prompt after it.
        add_generation_prompt=bool(body.get("add_generation_prompt", True)) and not continue_final,
        continue_final_message=continue_final,
        add_special_tokens=bool(body.get("add_special_tokens", False)),
        chat_template_kwargs=dict(kwargs) if isinstance(kwargs, dict) else {},
    )


def _completion(prompt: Any) -> TextPrompt | TokenPrompt | None:
    # A batch routes as one request: its first prompt decides.
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return TextPrompt(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return TokenPrompt(list(prompt))
    return None


_RESPONSE_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _responses(body: dict[str, Any]) -> ChatPrompt | None:
    """The chat vLLM builds from a Responses request: instructions as the system message,
    then the input (a string is one user message). Items other than messages (tool calls
    and their outputs, reasoning) are left out: the prefix before them still routes."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
                continue
            content = item.get("content")
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": part.get("text", "")}
                    for part in content
                    if isinstance(part, dict) and part.get("type") in _RESPONSE_TEXT_PARTS
                ]
            messages.append({"role": item["role"], "content": content})
    if not messages:
        return None
    tools = body.get("tools")
    return ChatPrompt(messages=messages, tools=None if not isinstance(tools, list) else _chat_tools(tools))


def _chat_tools(tools: list[Any]) -> list[Any] | None:
    """Responses tools are flat ({type, name, parameters}); chat templates take chat's shape."""
    converted = [
        {"type": "function", "function": {k: v for k, v in t.items() if k in ("name", "description", "parameters")}}
        for t in tools
        if isinstance(t, dict) and t.get("type") == "function"
    ]
    return converted or None
