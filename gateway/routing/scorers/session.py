from __future__ import annotations

from collections.abc import Mapping, Sequence

import xxhash

from gateway.endpoints.registry import Endpoint
from gateway.routing.base import BaseScorer, register
from gateway.types import EngineId, RoutingRequest


def rendezvous_weight(session_id: str, engine_id: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{session_id}\x00{engine_id}".encode())


@register("session")
class SessionScorer(BaseScorer):
    """Session affinity by rendezvous (highest-random-weight) hashing on a request header.

    Each session goes to the candidate with the highest hash of (session, engine). When an
    engine leaves, only its own sessions move; when one joins, it takes about 1/N of them.
    Requests without the header get no opinion (all 0), so other scorers decide.
    """

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        session_id = request.headers.get(self.context.session_header.lower())
        if not session_id or not endpoints:
            return {e.id: 0.0 for e in endpoints}
        best = max(endpoints, key=lambda e: rendezvous_weight(session_id, e.id))
        return {e.id: 1.0 if e is best else 0.0 for e in endpoints}
