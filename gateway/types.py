"""Shared vocabulary of the request path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NewType

if TYPE_CHECKING:
    from gateway.kvindex.base import PrefixMatch

EngineId = NewType("EngineId", str)
# The gateway's own chained chunk keys (from token ids); never mixed with engine block
# hashes, which arrive in KV events (engine_adapter.events.model.EngineBlockHash).
RequestChunkKey = NewType("RequestChunkKey", int)


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
    # The one engine that can serve it (Responses API: the engine that stored the
    # `previous_response_id`); the router offers only it while it is a candidate.
    pinned_engine: EngineId | None = None
    # Filled by the prefix service before routing (None: no routable prompt).
    num_prompt_tokens: int | None = None
    token_ids: list[int] = field(default_factory=list)
    chunk_keys: list[RequestChunkKey] = field(default_factory=list)
    # Per engine, the longest prefix of chunk_keys it holds (one index lookup per request).
    prefix_matches: dict[EngineId, PrefixMatch] = field(default_factory=dict)
