"""Shared vocabulary of the request path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NewType

EngineId = NewType("EngineId", str)


@dataclass(slots=True)
class RoutingRequest:
    """What policies see of one request: never the raw HTTP objects."""

    model: str
    api_path: str  # e.g. "/v1/chat/completions"
    body: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    request_id: str
    stream: bool = False
    # Engines already tried for this request (retries exclude them).
    excluded: set[EngineId] = field(default_factory=set)
