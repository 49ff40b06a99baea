"""The scorer contract. A policy is a weighted sum of scorers; each scorer is one file in
`gateway/routing/scorers/` registered under the name YAML uses.

Scorers are synchronous and cheap: they read what the request and the endpoints already
carry (load, health, prefix matches computed once per request) and never do I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from gateway.endpoints.registry import Endpoint
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.routing.cost_model import CostModel
from gateway.routing.ttft import TTFTEstimator
from gateway.types import EngineId, RoutingRequest


class ScorerParams(BaseModel):
    """Base of each scorer's own YAML parameters (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")


class Scorer(Protocol):
    name: ClassVar[str]
    # Reads the prompt's token ids, chunk keys or prefix matches: the gateway tokenizes and
    # indexes only when some scorer of the policy does.
    needs_prompt_tokens: ClassVar[bool]

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[EngineId, float]:
        """Score each candidate in [0, 1] (higher is better). Engines left out score 0.

        Must not mutate shared state: `/debug/route` calls it without routing.
        """
        ...

    def on_routed(self, request: RoutingRequest, endpoint: Endpoint) -> None:
        """Called once the router has chosen `endpoint` (stateful scorers update here)."""
        ...


class ScorerFactory(Protocol):
    Params: type[ScorerParams]

    def __call__(self, params: Any, context: ScorerContext) -> Scorer: ...


@dataclass
class ScorerContext:
    """What the gateway hands every scorer at construction (explicit dependencies)."""

    session_header: str = "x-session-id"
    # The engines' KV block size, shared with the index (known once an engine reports it).
    layout: KVLayout = field(default_factory=lambda: KVLayout(32))
    working_sets: WorkingSetTracker = field(default_factory=WorkingSetTracker)
    cost_model: CostModel = field(default_factory=CostModel)
    # Estimates from `cost_model`, with KV-transfer options where the gateway enables them;
    # unset, one over `cost_model` without transfers.
    ttft_estimator: TTFTEstimator | None = None

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def ttft(self) -> TTFTEstimator:
        if self.ttft_estimator is None:
            self.ttft_estimator = TTFTEstimator(self.cost_model, layout=self.layout)
        return self.ttft_estimator


SCORERS: dict[str, Any] = {}
T = TypeVar("T")


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a scorer selectable in YAML under `name`."""

    def wrap(cls: T) -> T:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} registered twice")
        cls.name = name  # type: ignore[attr-defined]
        SCORERS[name] = cls
        return cls

    return wrap


class BaseScorer:
    """Convenience base: no-op `on_routed`, params stored."""

    name: ClassVar[str]
    needs_prompt_tokens: ClassVar[bool] = False
    Params: ClassVar[type[ScorerParams]] = ScorerParams

    def __init__(self, params: ScorerParams, context: ScorerContext) -> None:
        self.params = params
        self.context = context

    def on_routed(self, request: RoutingRequest, endpoint: Endpoint) -> None:
        return None
