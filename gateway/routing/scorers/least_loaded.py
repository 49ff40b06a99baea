from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from gateway.endpoints.registry import Endpoint
from gateway.routing.base import BaseScorer, ScorerParams, register
from gateway.types import EngineId, RoutingRequest


class LeastLoadedParams(ScorerParams):
    # How much a full KV cache counts, in requests: a nearly full cache means preemptions soon.
    kv_cache_weight: float = Field(default=1.0, ge=0)


@register("least_loaded")
class LeastLoadedScorer(BaseScorer):
    """1 / (1 + load): an idle engine scores 1, each queued or running request lowers it.

    Load is the larger of the gateway's own in-flight count and the engine's reported
    running + waiting requests, plus the KV-cache usage weighted by `kv_cache_weight`.
    """

    Params = LeastLoadedParams
    params: LeastLoadedParams

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        weight = self.params.kv_cache_weight
        scores: dict[EngineId, float] = {}
        for e in endpoints:
            usage = e.stats.kv_cache_usage if e.stats is not None else 0.0
            scores[e.id] = 1.0 / (1.0 + e.load + weight * usage)
        return scores
