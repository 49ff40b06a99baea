"""Before forwarding: when the chosen engine would serve the request faster by first pulling a
prefix another engine holds (gateway.routing.ttft), do that (engine_adapter.transfer).

A transfer is an optimisation only: whatever goes wrong (holder gone, engine error, timeout),
the request goes on to the chosen engine, which recomputes; the client never sees it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine_adapter.transfer.nixl import EngineAddress, KVTransferError, NixlPullTransfer
from gateway.config import KVTransferConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.service import PrefixService
from gateway.metrics import GatewayMetrics
from gateway.routing.ttft import TransferOption, TTFTEstimator
from gateway.types import RoutingRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompletedTransfer:
    option: TransferOption
    local_s: float  # what the target's own way (own hit, store load or recompute) was estimated to take
    started_at: float  # time.perf_counter()


class KVTransferRunner:
    def __init__(
        self,
        transfer: NixlPullTransfer,
        estimator: TTFTEstimator,
        registry: EndpointRegistry,
        prefix: PrefixService,
        metrics: GatewayMetrics,
        config: KVTransferConfig,
    ) -> None:
        self._transfer = transfer
        self._estimator = estimator
        self._registry = registry
        self._prefix = prefix
        self._metrics = metrics
        self._config = config

    async def prepare(self, request: RoutingRequest, target: Endpoint) -> CompletedTransfer | None:
        """Move a prefix into `target` when that is estimated to beat recomputing it there.
        Returns the transfer once done; None when none was worth it or it failed."""
        if not request.token_ids or not target.kv_transfer:
            return None
        # What the kv_aware scorer estimated when it chose `target` (not a fresh estimate: the
        # model may have moved since, and the decision was made on this one).
        estimate = request.ttft_estimates.get(target.id)
        if estimate is None:
            self._estimator.refresh()
            estimate = self._estimator.estimate(request, target)
        option = estimate.transfer
        if option is None or not estimate.transfers:
            return None
        holder = self._registry.get(option.source)
        if holder is None:
            return None
        m = self._metrics
        m.kv_transfers.labels("attempted").inc()
        self._estimator.transfer_model.about_to_move(target)
        started = time.perf_counter()
        try:
            timings = await self._transfer.transfer(
                EngineAddress(holder.url, holder.api_key),
                EngineAddress(target.url, target.api_key),
                request.model,
                list(request.token_ids[: option.prefix_tokens]),
                timeout_s=self._config.timeout_s,
                request_id=request.request_id,
            )
        except KVTransferError as exc:
            self._fell_back(request, holder, target, exc.stage, str(exc))
            return None
        except Exception as exc:  # a bug here must not fail the client's request
            logger.exception("request %s: KV transfer raised", request.request_id)
            self._fell_back(request, holder, target, "error", repr(exc))
            return None
        m.kv_transfers.labels("succeeded").inc()
        m.kv_transfer_tokens.labels(holder.id, target.id).inc(option.moved_tokens)
        m.kv_transfer_duration.observe(timings.total_s)
        self._estimator.transfer_model.observe(target.id, option.moved_tokens, timings.total_s)
        self._prefix.record_transferred(request, target, option.prefix_tokens)
        logger.info(
            "request %s: moved %d tokens of KV %s -> %s in %.0f ms",
            request.request_id, option.moved_tokens, holder.id, target.id, timings.total_s * 1000,
        )  # fmt: skip
        return CompletedTransfer(option, estimate.local_s, started)

    def _fell_back(self, request: RoutingRequest, holder: Endpoint, target: Endpoint, stage: str, why: str) -> None:
        self._metrics.kv_transfers.labels("fell_back").inc()
        self._metrics.kv_transfer_failures.labels(stage).inc()
        logger.warning(
            "request %s: KV transfer %s -> %s failed at %s (%s); recomputing",
            request.request_id, holder.id, target.id, stage, why,
        )  # fmt: skip

    def first_byte(self, transfer: CompletedTransfer, at: float) -> None:
        """The request's first byte after a transfer: estimate against what happened."""
        ttft = self._metrics.kv_transfer_ttft
        ttft.labels("recompute_estimated").inc(transfer.local_s)
        ttft.labels("transfer_estimated").inc(transfer.option.ttft_s)
        ttft.labels("observed").inc(max(0.0, at - transfer.started_at))
