"""Which engine produced which Responses API response id.

vLLM engines started with `VLLM_ENABLE_RESPONSES_API_STORE=1` keep stored responses in their
own process memory: only that engine can continue a conversation from it
(`previous_response_id`), retrieve it or cancel it; every other engine answers 404. The
dispatcher records the engine of every response id it passes through (read from the body
by `gateway.proxy.usage.UsageTap`) and pins follow-ups to it.

The map is bounded: least recently used ids go first. It is per gateway process and not
persisted: after a restart, or through another gateway replica, an id is unknown; a request
continuing from an unknown id is routed normally (see `Dispatcher`).
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.types import EngineId

DEFAULT_CAPACITY = 100_000
# Ids are the engine's own (`resp_<uuid>`) or a client-chosen request id: refuse absurd ones.
MAX_ID_CHARS = 256


class ResponseAffinity:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._engines: OrderedDict[str, EngineId] = OrderedDict()

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

    def __len__(self) -> int:
        return len(self._engines)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._engines
