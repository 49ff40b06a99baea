"""The fields of a request body the gateway itself reads, checked before it reads them.

The engine validates the whole request; the gateway only needs what it uses (to route, to
tokenize, to key the cache) to be of the type it expects. A body that is not gets a 400 that
names the field, as the OpenAI API does, never a 500 and a traceback. Everything else passes
to the engine untouched, which answers for it.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import BadRequest
from gateway.proxy.paths import RESPONSES_PATH
from gateway.tokenization.prompt import CHAT_PATH, COMPLETIONS_PATH

# Token ids are unsigned 32-bit in every vLLM tokenizer (and in the gateway's chunk hashing).
MAX_TOKEN_ID = 2**32 - 1
# Values of a boolean field vLLM accepts as strings (pydantic's lax mode): mirror them.
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("Request body is empty; expected a JSON object.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, too many digits
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("Request body is not valid JSON: nested too deeply.") from None
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object.")
    return data


def check_request(api_path: str, data: dict[str, Any], *, allow_chat_templates: bool) -> None:
    """Raise BadRequest naming the first field the gateway reads that has the wrong type."""
    for name in ("model", "cache_salt", "previous_response_id"):
        value = data.get(name)
        if value is not None:
            _text(value, name)
    if "stream" in data:
        data["stream"] = as_bool(data["stream"], "stream")
    if "kv_transfer_params" in data:
        # The gateway moves KV itself (KV transfers, prefill/decode disaggregation). A client's
        # own would have a NIXL engine pull blocks from whatever host and port it names.
        raise BadRequest("kv_transfer_params is set by the gateway, not by clients.", param="kv_transfer_params")
    # A missing field is the engine's to refuse: the gateway only needs what is there to be usable.
    if api_path == CHAT_PATH and "messages" in data:
        _messages(data["messages"])
    elif api_path == COMPLETIONS_PATH and "prompt" in data:
        _prompt(data["prompt"])
    if api_path in (CHAT_PATH, RESPONSES_PATH) or "chat_template" in data:
        _chat_template(data, allow_chat_templates)


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRequest(f"Invalid type for '{name}': expected a boolean.", param=name)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"Invalid type for '{name}': expected a string.", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"Invalid '{name}': not valid Unicode (a lone surrogate).", param=name) from None
    return value


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("Invalid 'messages': expected a non-empty array of messages.", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"Invalid '{where}': expected an object.", param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"Invalid '{where}.role': expected a string.", param=f"{where}.role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            if content is not None:
                _text(content, f"{where}.content")
            continue
        if not isinstance(content, list):
            raise BadRequest(f"Invalid '{where}.content': expected a string or an array of parts.",
                             param=f"{where}.content")  # fmt: skip
        for j, part in enumerate(content):
            part_where = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise BadRequest(f"Invalid '{part_where}': expected an object.", param=part_where)
            if part.get("type") == "text" or "text" in part:
                _text(part.get("text"), f"{part_where}.text")


def _prompt(prompt: Any) -> None:
    """A string, token ids, or a batch of either."""
    if isinstance(prompt, str):
        _text(prompt, "prompt")
        return
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("Invalid 'prompt': expected a string, an array of strings or of token ids.", param="prompt")
    if not isinstance(prompt[0], (str, list)):
        _token_ids(prompt)
        return
    for item in prompt:
        if isinstance(item, str):
            _text(item, "prompt")
        elif isinstance(item, list) and item:
            _token_ids(item)
        else:
            raise BadRequest("Invalid 'prompt': a batch holds strings or arrays of token ids.", param="prompt")


def _token_ids(ids: list[Any]) -> None:
    for token in ids:
        if type(token) is not int or not 0 <= token <= MAX_TOKEN_ID:
            raise BadRequest(f"Invalid 'prompt': token ids are integers from 0 to {MAX_TOKEN_ID}.", param="prompt")


def _chat_template(data: dict[str, Any], allowed: bool) -> None:
    """A chat template is code the renderer runs (Jinja): a client's own can loop for ever or
    allocate gigabytes. Refused unless `proxy.allow_client_chat_templates` (vLLM itself
    refuses them unless started with --trust-request-chat-template)."""
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadRequest("Invalid type for 'chat_template_kwargs': expected an object.", param="chat_template_kwargs")
    given = data.get("chat_template") is not None or (isinstance(kwargs, dict) and "chat_template" in kwargs)
    if given and not allowed:
        raise BadRequest(
            "Client-supplied chat templates are not accepted by this gateway; the model's own template is used.",
            param="chat_template",
        )
