"""Read the engine-reported `usage` out of a response as it passes through.

Non-streamed JSON: the body is small; it is kept (up to a cap) and parsed at the end.
Event streams: only events that mention "usage" are parsed. When the gateway itself asked for
the usage event (the client did not set `stream_options.include_usage`), that final event,
which has an empty `choices` list, is removed from what the client receives, so the client
sees exactly the stream it asked for.

Responses API (`/v1/responses`): with `on_response_id`, the tap also reads the response id,
from the JSON body's top-level `id` or from the first `response.*` event of a stream
(`response.created`, whose `response` object carries the id and `usage: null`), and the
usage from `response.completed`, in the chat shape (`input_tokens` → `prompt_tokens`,
`input_tokens_details` → `prompt_tokens_details`) so predictions are checked the same way.
Nothing more is buffered for it: the events read are the ones already scanned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from gateway.proxy.body import with_member

_MAX_JSON_BODY = 4 * 1024 * 1024
# A body past the cap is not parsed; vLLM writes the response's `id` first, so read it there.
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([^"\\]{1,256})"')


class UsageTap:
    def __init__(
        self,
        *,
        event_stream: bool,
        strip_usage_event: bool,
        on_response_id: Callable[[str], None] | None = None,
    ) -> None:
        self._event_stream = event_stream
        self._strip = strip_usage_event
        self._pending = b""
        self._body = bytearray()
        self.usage: dict[str, Any] | None = None
        # Responses API: called once, with the first response id seen.
        self._on_response_id = on_response_id
        self.response_id: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to forward for this chunk (all of them unless stripping)."""
        if not self._event_stream:
            if len(self._body) < _MAX_JSON_BODY:
                self._body += chunk
            return chunk
        if not self._strip:
            # Forward untouched; look at whole events only for reading usage.
            self._scan(chunk)
            return chunk
        data = self._pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: cut + 2], data[cut + 2 :]
        return b"".join(e + b"\n\n" for e in complete.split(b"\n\n")[:-1] if not self._is_usage_only(e))

    def finish(self) -> bytes:
        if not self._event_stream:
            try:
                parsed = json.loads(bytes(self._body))
            except (ValueError, UnicodeDecodeError):
                if self._on_response_id is not None and (found := _LEADING_ID.match(self._body)):
                    self._found_response_id(found.group(1).decode("utf-8", "replace"))
                return b""
            usage = parsed.get("usage") if isinstance(parsed, dict) else None
            self.usage = _chat_shaped(usage) if isinstance(usage, dict) else None
            if self._on_response_id is not None and isinstance(parsed, dict):
                self._found_response_id(parsed.get("id"))
            return b""
        rest, self._pending = self._pending, b""
        if not self._strip:
            self._read_usage(rest)  # already forwarded by feed(); only read it
            return b""
        if rest and self._is_usage_only(rest.rstrip(b"\n")):
            return b""
        return rest

    def _scan(self, chunk: bytes) -> None:
        data = self._pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data[-65536:]
            return
        for event in data[:cut].split(b"\n\n"):
            self._read_usage(event)
        self._pending = data[cut + 2 :]

    def _is_usage_only(self, event: bytes) -> bool:
        payload = self._read_usage(event)
        return payload is not None and not payload.get("choices")

    def _read_usage(self, event: bytes) -> dict[str, Any] | None:
        """The event's payload when it has a top-level `usage` (chat/completions); Responses
        API events (`response.*`, the usage nested in `response`) are read, None returned."""
        responses_event = self._on_response_id is not None and b'"response.' in event
        if b'"usage"' not in event and not responses_event:
            return None
        data = _event_data(event)
        if data is None:
            return None
        try:
            payload = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(payload, dict):
            return None
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
            return payload
        if responses_event:
            self._read_responses_event(payload)
        return None

    def _read_responses_event(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        response = payload.get("response")
        if not isinstance(kind, str) or not kind.startswith("response.") or not isinstance(response, dict):
            return
        self._found_response_id(response.get("id"))
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.usage = _chat_shaped(usage)

    def _found_response_id(self, response_id: Any) -> None:
        if self.response_id is not None or not isinstance(response_id, str) or not response_id:
            return
        self.response_id = response_id
        if self._on_response_id is not None:
            self._on_response_id(response_id)


def _event_data(event: bytes) -> bytes | None:
    """The data of one server-sent event (its `data:` lines joined), None without any. vLLM's
    Responses API events have an `event:` line before the data; chat events have none."""
    lines = [line.strip() for line in event.strip().split(b"\n")]
    data = [line[5:] for line in lines if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _chat_shaped(usage: dict[str, Any]) -> dict[str, Any]:
    """Responses API usage (`input_tokens`, `input_tokens_details`, `output_tokens`) in the
    chat/completions shape the prediction check reads; chat usage is returned as it is."""
    if "prompt_tokens" in usage or "input_tokens" not in usage:
        return usage
    shaped = dict(usage)
    shaped["prompt_tokens"] = usage.get("input_tokens")
    shaped["completion_tokens"] = usage.get("output_tokens")
    details = usage.get("input_tokens_details")
    if isinstance(details, dict):
        shaped["prompt_tokens_details"] = details
    return shaped


def cached_tokens(usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    value = details.get("cached_tokens")
    return value if isinstance(value, int) else None


def ask_for_usage(body: dict[str, Any], raw: bytes) -> tuple[bytes, bool]:
    """A stream carries usage only when asked (`stream_options.include_usage`). To check its
    prediction, the gateway asks where the client did not: returns the body to send and
    whether the usage event must be removed from what the client sees (`UsageTap`)."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return raw, False
    if "stream_options" not in body:
        added = with_member(raw, "stream_options", {"include_usage": True})
        if added is not None:
            return added, True
    patched = dict(body)
    patched["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(patched).encode(), True
