from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.endpoints.registry import Endpoint
from gateway.routing.base import BaseScorer, register
from gateway.types import EngineId, RoutingRequest


@register("kv_aware")
class KVAwareScorer(BaseScorer):
    """Estimated time to first token per engine (gateway.routing.cost_model): queue delay
    plus prefill of the tokens the engine does not hold. Score = fastest / this engine's.

    The requests on the engine are its live load (our in-flight count plus others' work at the
    last scrape), not the scraped running count alone: a burst changes it between scrapes."""

    def estimates(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> dict[EngineId, float]:
        model = self.context.cost_model
        n = request.num_prompt_tokens or 0
        block = self.context.block_size
        estimates: dict[EngineId, float] = {}
        for e in endpoints:
            match = request.prefix_matches.get(e.id)
            cached = min(match.num_chunks * block, max(0, n - 1)) if match is not None else 0
            estimates[e.id] = model.ttft_s(cached, n - cached, e.pending_prefill_s, e.load)
        return estimates

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        estimates = self.estimates(request, endpoints)
        if not estimates:
            return {}
        fastest = min(estimates.values())
        return {engine: (fastest / t if t > 0 else 1.0) for engine, t in estimates.items()}
