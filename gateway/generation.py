"""What one configuration builds: the parts a request uses from its arrival to its last byte.

A reload (gateway.runtime) builds a new `Generation` beside the running one, then swaps the
one reference to it; a request reads that reference once, when it arrives (`current`), and
keeps what it read, so it sees the old configuration or the new one, never a mix. What
outlives configurations (the index, the cost model, each engine's health and load, the
clients) is shared by both.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from gateway.api.auth import APIKeys
from gateway.config import GatewayConfig
from gateway.endpoints.registry import EndpointRegistry
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.service import PrefixService
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.proxy.dispatcher import Dispatcher
from gateway.proxy.transfer import KVTransferRunner
from gateway.routing.base import ScorerContext
from gateway.routing.cost_model import CostModel
from gateway.routing.registry import build_scorers, policy_label
from gateway.routing.router import Router
from gateway.routing.store_model import StoreLoadModel
from gateway.routing.transfer_model import TransferCostModel
from gateway.routing.ttft import TTFTEstimator


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    router: Router
    estimator: TTFTEstimator
    # Tokenize, index and follow the engines' KV events only for a policy that reads prompts.
    uses_prefix: bool
    # Transfers are planned by the kv_aware scorer's estimates: without it, none.
    plans_transfers: bool


def plan_routing(
    config: GatewayConfig,
    registry: EndpointRegistry,
    *,
    layout: KVLayout,
    working_sets: WorkingSetTracker,
    cost_model: CostModel,
    transfer_model: TransferCostModel,
    store_model: StoreLoadModel,
) -> RoutingPlan:
    """The policy of `config` over `registry`'s engines; ConfigError naming the field when it
    cannot be built. No I/O: a bad policy fails before anything starts for it."""
    estimator = TTFTEstimator(
        cost_model, layout=layout, registry=registry, transfer_model=transfer_model,
        transfer_config=config.kv_transfer, store_model=store_model,
    )  # fmt: skip
    context = ScorerContext(
        session_header=config.routing.session_header,
        layout=layout,
        working_sets=working_sets,
        cost_model=cost_model,
        ttft_estimator=estimator,
    )
    scorers = build_scorers(config.routing, context)
    uses_prefix = config.kv_index.enabled and any(w.scorer.needs_prompt_tokens and w.weight > 0 for w in scorers)
    plans_transfers = (
        uses_prefix
        and config.kv_transfer.enabled
        and any(w.scorer.name == "kv_aware" and w.weight > 0 for w in scorers)
        and sum(e.kv_transfer for e in config.engines) >= 2
    )
    return RoutingPlan(Router(registry, scorers, policy_label(config.routing)), estimator, uses_prefix, plans_transfers)


@dataclass(frozen=True, slots=True)
class Generation:
    config: GatewayConfig
    registry: EndpointRegistry
    router: Router
    estimator: TTFTEstimator
    uses_prefix: bool
    prefix: PrefixService | None
    transfers: KVTransferRunner | None
    dispatcher: Dispatcher
    api_keys: APIKeys


def current(request: Request) -> Generation:
    """The generation in force when called: read it once per request and keep it."""
    generation: Generation = request.app.state.runtime.generation
    return generation
