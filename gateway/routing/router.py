"""The router: filter candidates, score them with every weighted scorer, pick the best."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.errors import ModelNotFound, NoHealthyEndpoint
from gateway.routing.registry import WeightedScorer
from gateway.types import EngineId, RoutingRequest


# Which engines a routing decision may choose among (the model's candidates otherwise).
Pool = Callable[[Endpoint], bool]


@dataclass(slots=True)
class RoutingDecision:
    endpoint: Endpoint
    policy: str
    totals: dict[EngineId, float]
    # scorer name -> engine -> raw score (before weighting)
    by_scorer: dict[str, dict[EngineId, float]] = field(default_factory=dict)


class Router:
    def __init__(self, registry: EndpointRegistry, scorers: Sequence[WeightedScorer], policy: str) -> None:
        self._registry = registry
        self._scorers = list(scorers)
        self._policy = policy
        # Rotates among equally scored engines so ties do not always fall to the first.
        self._tie_breaker = itertools.count()

    @property
    def scorers(self) -> Sequence[WeightedScorer]:
        return self._scorers

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def registry(self) -> EndpointRegistry:
        return self._registry

    def candidates(self, request: RoutingRequest, pool: Pool | None = None) -> Sequence[Endpoint]:
        """`pool`: only the engines it accepts (prefill/decode disaggregation picks among the
        prefill-capable ones); the caller checks first that the pool has some."""
        candidates = self._registry.candidates(request.model, request.excluded)
        if pool is not None:
            candidates = [e for e in candidates if pool(e)]
        if request.pinned_engine is not None:
            # Only that engine while it can take the request; otherwise (down, draining,
            # ejected, already tried) the others, which then answer for themselves.
            pinned = [e for e in candidates if e.id == request.pinned_engine]
            if pinned:
                return pinned
        if candidates:
            return candidates
        if request.model not in self._registry.known_models():
            raise ModelNotFound(f"The model `{request.model}` does not exist.", param="model")
        raise NoHealthyEndpoint(f"No healthy engine is available for model `{request.model}`; retry later.")

    def evaluate(self, request: RoutingRequest, pool: Pool | None = None) -> RoutingDecision:
        """Score every candidate and pick one, without committing (no scorer state changes)."""
        candidates = self.candidates(request, pool)
        totals: dict[EngineId, float] = {e.id: 0.0 for e in candidates}
        by_scorer: dict[str, dict[EngineId, float]] = {}
        for weighted in self._scorers:
            scores = weighted.scorer.score(request, candidates)
            by_scorer[weighted.scorer.name] = {e.id: float(scores.get(e.id, 0.0)) for e in candidates}
            for engine_id, value in by_scorer[weighted.scorer.name].items():
                totals[engine_id] += weighted.weight * value
        best = max(totals.values())
        # Float sums of equal terms can differ in the last bits; treat near-equal as a tie.
        tied = [e for e in candidates if totals[e.id] >= best - 1e-9]
        chosen = tied[next(self._tie_breaker) % len(tied)] if len(tied) > 1 else tied[0]
        return RoutingDecision(chosen, self._policy, totals, by_scorer)

    def route(self, request: RoutingRequest, pool: Pool | None = None) -> RoutingDecision:
        decision = self.evaluate(request, pool)
        for weighted in self._scorers:
            weighted.scorer.on_routed(request, decision.endpoint)
        return decision

    def candidates_left(self, request: RoutingRequest) -> bool:
        return bool(self._registry.candidates(request.model, request.excluded))
