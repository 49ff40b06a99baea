from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from gateway.endpoints.registry import Endpoint
from gateway.routing.base import BaseScorer, ScorerParams, register
from gateway.types import EngineId, RoutingRequest


class CapacityParams(ScorerParams):
    # Fill level of the working set (fraction of the KV cache) considered safe; above it the
    # score drops to 0 at 100 %.
    target_fill: float = Field(default=0.8, gt=0, le=1)


@register("capacity")
class CapacityScorer(BaseScorer):
    """Room in the engine's KV cache for this request's working set, 0..1.

    working set = chunks routed to the engine recently (gateway.kvindex.working_set), plus
    the chunks of this prompt the engine does not already have there. An engine whose
    working set would exceed its cache evicts prefixes still in use, so new prefix groups
    should go where they fit. Engines of unknown capacity score 0.5 (no opinion).
    """

    needs_prompt_tokens = True
    Params = CapacityParams
    params: CapacityParams

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        working_sets = self.context.working_sets
        scores: dict[EngineId, float] = {}
        for e in endpoints:
            capacity = e.capacity_blocks
            if not capacity:
                scores[e.id] = 0.5
                continue
            new_chunks = request.num_unread_chunks + working_sets.num_missing(e.id, request.chunk_keys)
            fill = (working_sets.size(e.id) + new_chunks) / capacity
            target = self.params.target_fill
            if fill <= target:
                scores[e.id] = 1.0 - 0.5 * fill / target
            else:
                scores[e.id] = max(0.0, 0.5 * (1.0 - fill) / (1.0 - target)) if target < 1 else 0.0
        return scores
