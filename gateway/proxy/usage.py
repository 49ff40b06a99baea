"""Read the engine-reported `usage` out of a response as it passes through.

Non-streamed JSON: the body is small; it is kept (up to a cap) and parsed at the end.
Event streams: only events that mention "usage" are parsed. When the gateway itself asked for
the usage event (the client did not set `stream_options.include_usage`), that final event,
which has an empty `choices` list, is removed from what the client receives, so the client
sees exactly the stream it asked for.
"""

from __future__ import annotations

import json
from typing import Any

_MAX_JSON_BODY = 4 * 1024 * 1024


class UsageTap:
    def __init__(self, *, event_stream: bool, strip_usage_event: bool) -> None:
        self._event_stream = event_stream
        self._strip = strip_usage_event
        self._pending = b""
        self._body = bytearray()
        self.usage: dict[str, Any] | None = None

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
                return b""
            usage = parsed.get("usage") if isinstance(parsed, dict) else None
            self.usage = usage if isinstance(usage, dict) else None
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
        if b'"usage"' not in event:
            return None
        line = event.strip()
        if not line.startswith(b"data:"):
            return None
        try:
            payload = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
            return payload
        return None


def cached_tokens(usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    value = details.get("cached_tokens")
    return value if isinstance(value, int) else None
