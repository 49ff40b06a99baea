from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.endpoints.registry import Endpoint
from gateway.routing.base import BaseScorer, ScorerContext, ScorerParams, register
from gateway.types import EngineId, RoutingRequest


@register("round_robin")
class RoundRobinScorer(BaseScorer):
    """1 for the engine whose turn it is, 0 for the others. The turn advances only when a
    request is actually routed, so explaining a decision does not disturb the rotation."""

    def __init__(self, params: ScorerParams, context: ScorerContext) -> None:
        super().__init__(params, context)
        self._turn = 0

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        if not endpoints:
            return {}
        ordered = sorted(endpoints, key=lambda e: e.id)
        chosen = ordered[self._turn % len(ordered)]
        return {e.id: 1.0 if e is chosen else 0.0 for e in endpoints}

    def on_routed(self, request: RoutingRequest, endpoint: Endpoint) -> None:
        self._turn += 1
