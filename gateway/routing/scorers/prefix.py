from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from gateway.endpoints.registry import Endpoint
from gateway.kvindex.base import TIER_APPROXIMATE, TIER_CPU, TIER_GPU, TIER_REPORTED, TIER_SPECULATIVE, TIER_STORAGE
from gateway.routing.base import BaseScorer, ScorerParams, register
from gateway.types import EngineId, RoutingRequest


class PrefixParams(ScorerParams):
    # What a cached token is worth per tier, relative to one in the engine's own memory.
    tier_weights: dict[str, float] = Field(
        default_factory=lambda: {TIER_GPU: 1.0, TIER_CPU: 0.8, TIER_STORAGE: 0.5, TIER_SPECULATIVE: 1.0,
                                 TIER_APPROXIMATE: 0.5, TIER_REPORTED: 1.0}  # fmt: skip
    )
    # Matches shorter than this (tokens) are no reason to prefer an engine.
    min_match_tokens: int = Field(default=64, ge=0)
    # A match counts only for the part beyond what every candidate already holds: a prefix
    # that is everywhere (a shared system prompt once warm) does not pin requests anywhere.
    relative: bool = True
    # Affinity is released when an engine has this many more requests than the least loaded.
    max_load_imbalance: float = Field(default=4.0, gt=0)


@register("prefix")
class PrefixScorer(BaseScorer):
    """Fraction of the prompt's tokens cached on each engine (tier-weighted), 0..1."""

    needs_prompt_tokens = True
    Params = PrefixParams
    params: PrefixParams

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        n = request.num_prompt_tokens
        if not n or not endpoints:
            return {e.id: 0.0 for e in endpoints}
        block = self.context.block_size
        weights = self.params.tier_weights
        cached: dict[EngineId, float] = {}
        for e in endpoints:
            match = request.prefix_matches.get(e.id)
            if match is None:
                cached[e.id] = 0.0
                continue
            best = max((weights.get(t, 0.0) * length for t, length in match.by_tier.items()), default=0.0)
            cached[e.id] = best * block
        floor = min(cached.values()) if self.params.relative else 0.0
        min_load = min(e.load for e in endpoints)
        scores: dict[EngineId, float] = {}
        for e in endpoints:
            useful = cached[e.id] - floor
            if useful < self.params.min_match_tokens or e.load - min_load >= self.params.max_load_imbalance:
                scores[e.id] = 0.0
            else:
                scores[e.id] = min(1.0, useful / n)
        return scores
