"""Which engine produced which Responses API response id.

vLLM engines started with `VLLM_ENABLE_RESPONSES_API_STORE=1` keep stored responses in their
own process memory: only that engine can continue a conversation from it
(`previous_response_id`), retrieve it or cancel it; every other engine answers 404. The
dispatcher records the engine of every response id it passes through (read from the body
by `gateway.proxy.usage.UsageTap`) and pins follow-ups to it.

The gateway also names the responses itself where the client did not: vLLM uses a
request's `request_id` as the response id, and the dispatcher sets it to
`resp_gw<engine tag><random>`, the tag a hash of the engine's name. Such an id says where the
response lives to every gateway process that knows the fleet: other workers, other replicas,
this one after a restart. The map is for ids chosen otherwise (a client's own `request_id`);
it is bounded, least recently used ids first, per process and not persisted: a request
continuing from an id that is neither tagged nor known is routed normally (see `Dispatcher`).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from gateway.proxy.body import with_member
from gateway.types import EngineId

_TAGGED = "resp_gw"
_TAG_CHARS = 8

DEFAULT_CAPACITY = 100_000
# Ids are the engine's own (`resp_<uuid>`) or a client-chosen request id: refuse absurd ones.
MAX_ID_CHARS = 256


class ResponseAffinity:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, fleet: Callable[[], Iterable[EngineId]] = tuple) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._engines: OrderedDict[str, EngineId] = OrderedDict()
        self._fleet = fleet
        self._by_tag: dict[str, EngineId] = {}

    @staticmethod
    def new_id(engine: EngineId) -> str:
        """A response id that names `engine` (to be sent as the request's `request_id`)."""
        return f"{_TAGGED}{_tag(engine)}{uuid.uuid4().hex}"

    def _tagged_engine(self, response_id: str) -> EngineId | None:
        if not response_id.startswith(_TAGGED):
            return None
        tag = response_id[len(_TAGGED) : len(_TAGGED) + _TAG_CHARS]
        engine = self._by_tag.get(tag)
        if engine is None:  # an engine added since, or the first look: map the fleet again
            self._by_tag = {_tag(e): e for e in self._fleet()}
            engine = self._by_tag.get(tag)
        return engine

    def remember(self, response_id: str, engine: EngineId) -> None:
        if not response_id or len(response_id) > MAX_ID_CHARS:
            return
        self._engines[response_id] = engine
        self._engines.move_to_end(response_id)
        while len(self._engines) > self.capacity:
            self._engines.popitem(last=False)

    def engine_for(self, response_id: object) -> EngineId | None:
        """The engine that stored `response_id` (anything else than a known id: None)."""
        if not isinstance(response_id, str):
            return None
        engine = self._engines.get(response_id)
        if engine is not None:
            self._engines.move_to_end(response_id)  # a conversation in use stays
            return engine
        return self._tagged_engine(response_id)

    def __len__(self) -> int:
        return len(self._engines)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._engines


def _tag(engine: EngineId) -> str:
    return f"{xxhash.xxh3_64_intdigest(engine.encode()):016x}"[:_TAG_CHARS]


def name_response(affinity: ResponseAffinity, body: dict[str, Any], raw: bytes, engine: EngineId) -> bytes:
    """A Responses request the client gave no `request_id` is sent with one that names the
    engine (`ResponseAffinity.new_id`): one member added in front of the body."""
    if "request_id" in body:
        return raw
    named = with_member(raw, "request_id", affinity.new_id(engine))
    return raw if named is None else named
