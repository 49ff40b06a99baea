"""Small edits to a request body as the client sent it: the gateway adds a member in front
instead of parsing and re-serializing the whole JSON (tens of kilobytes for a long prompt)."""

from __future__ import annotations

import json


def with_member(raw: bytes, name: str, value: object) -> bytes | None:
    """`raw` (a JSON object) with `"name": value` added as its first member, or None when
    `raw` does not start with `{` (leading whitespace, say: the caller re-serializes). The
    caller knows `name` is not in the object already."""
    if raw[:1] != b"{":
        return None
    rest = raw[1:]
    separator = b"" if rest.lstrip().startswith(b"}") else b","
    return b"{" + json.dumps(name).encode() + b":" + json.dumps(value, separators=(",", ":")).encode() + separator + rest
