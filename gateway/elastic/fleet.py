"""Joins and drains of the running fleet, warmed (gateway.elastic.warmup): what the runtime
calls when an engine joins (a reload, the admin API) and the admin API when one is drained."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine_adapter.transfer.nixl import NixlPullTransfer
from gateway.elastic.hot_prefixes import HotPrefixes
from gateway.elastic.warmup import Outcome, Plan, Pull, Warmer, plan_drain, plan_join, speculative_entry
from gateway.endpoints.registry import Endpoint
from gateway.generation import Generation
from gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)


class ElasticFleet:
    def __init__(self, hot: HotPrefixes, transfer: NixlPullTransfer, metrics: GatewayMetrics) -> None:
        self.hot = hot
        self._warmer = Warmer(transfer, metrics)

    def would_warm(self, endpoint: Endpoint, generation: Generation) -> bool:
        """Whether a joining `endpoint` is kept out of rotation until `warm` has run."""
        return (generation.config.elastic.warm_on_join and generation.prefix is not None
                and endpoint.kv_transfer and len(self.hot) > 0)  # fmt: skip

    async def warm(self, endpoint: Endpoint, generation: Generation) -> Outcome | None:
        """Pull the hot prefixes `endpoint` lacks into it. The caller puts it in rotation after."""
        prefix = generation.prefix
        if not self.would_warm(endpoint, generation) or prefix is None:
            return None
        config = generation.config
        plan = plan_join(
            endpoint, self.hot.hottest(), prefix.lookup, generation.registry.transfer_sources,
            block_size=prefix.block_size, min_prefix_tokens=config.kv_transfer.min_prefix_tokens, config=config.elastic,
        )  # fmt: skip
        return await self._run("join", endpoint, plan, generation)

    async def hand_off(self, endpoint: Endpoint, generation: Generation) -> Outcome | None:
        """Move the hot prefixes only the drained `endpoint` holds to peers in rotation."""
        prefix, config = generation.prefix, generation.config
        if not config.elastic.handoff_on_drain or prefix is None or not endpoint.kv_transfer or not len(self.hot):
            return None

        def peers(model: str) -> Sequence[Endpoint]:
            return [e for e in generation.registry.candidates(model, excluded=(endpoint.id,)) if e.kv_transfer]

        plan = plan_drain(
            endpoint, self.hot.hottest(), prefix.lookup, peers,
            block_size=prefix.block_size, min_prefix_tokens=config.kv_transfer.min_prefix_tokens, config=config.elastic,
        )  # fmt: skip
        return await self._run("drain", endpoint, plan, generation)

    async def _run(self, event: str, endpoint: Endpoint, plan: Plan, generation: Generation) -> Outcome:
        prefix = generation.prefix
        assert prefix is not None
        config = generation.config

        def pulled(pull: Pull) -> None:
            target, keys, tier = speculative_entry(pull, prefix.block_size)
            prefix.index.add(target, keys, tier, ttl_s=config.kv_index.speculative_ttl_s)

        outcome = await self._warmer.run(
            event, plan, generation.registry.get, pulled,
            max_s=config.elastic.max_s,
        )  # fmt: skip
        logger.info(
            "%s of %s: %d hot prefixes pulled (%d tokens, %.0f ms), %d failed, %d over budget, %d from the "
            "shared store, %d held already, %d held by no engine that can give KV, %d too small to move",
            event, endpoint.id, outcome.num_pulled, outcome.moved_tokens, outcome.duration_s * 1000, outcome.num_failed,
            outcome.num_over_budget, outcome.num_in_store, outcome.num_held, outcome.num_unheld, outcome.num_too_small,
        )  # fmt: skip
        return outcome
