from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.endpoints.registry import Endpoint
from gateway.routing.base import BaseScorer, register
from gateway.routing.ttft import TTFTEstimate
from gateway.types import EngineId, RoutingRequest


@register("kv_aware")
class KVAwareScorer(BaseScorer):
    """Estimated time to first token per engine (gateway.routing.ttft): queue delay plus the
    fastest way the engine can be given the prompt's prefix: its own cache, its shared store
    (which the engine loads by itself when the store reaches further), a pull from a peer
    (KV transfer, when on), or recomputing it. Score = fastest engine's estimate / this
    engine's.

    The requests on an engine are its live load (our in-flight count plus others' work at the
    last scrape), not the scraped running count alone: a burst changes it between scrapes."""

    needs_prompt_tokens = True

    def estimates(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> dict[EngineId, TTFTEstimate]:
        estimator = self.context.ttft
        estimator.refresh()
        return {e.id: estimator.estimate(request, e) for e in endpoints}

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        # Kept on the request: a peer pull chosen here is executed by gateway.proxy.transfer.
        request.ttft_estimates = self.estimates(request, endpoints)
        seconds = {engine: estimate.best_s for engine, estimate in request.ttft_estimates.items()}
        if not seconds:
            return {}
        fastest = min(seconds.values())
        return {engine: (fastest / t if t > 0 else 1.0) for engine, t in seconds.items()}
