"""Estimated time to first token of one request on one engine, by the best way to serve it
there: recompute the part of the prompt the engine lacks, or first pull the longer prefix
another engine holds (KV transfer, engine_adapter.transfer) and recompute only the rest.

    recompute = overhead + queue(target) + d·load(target) + prefill(c_target, n − c_target)
    transfer  = max(queue(target), holder's turn + move(P − c_target))
                + overhead + d·load(target) + prefill(P, n − P)

P is the block-aligned prefix the holder has in its own KV cache (confirmed by its events),
never the prompt's last token. The queue on the target drains while the transfer runs, hence
the max. "Waiting for the busy holder" is the holder's own recompute estimate: the kv_aware
scorer compares engines, so the three options meet there.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import KVTransferConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU
from gateway.kvindex.layout import KVLayout
from gateway.routing.cost_model import CostModel
from gateway.routing.transfer_model import TransferCostModel
from gateway.types import EngineId, RoutingRequest, cached_prefix_tokens


@dataclass(frozen=True, slots=True)
class TransferOption:
    source: EngineId
    prefix_tokens: int  # P: what the target holds once the transfer is done
    moved_tokens: int  # P minus what the target held already
    transfer_s: float  # the holder's turn plus the move
    ttft_s: float  # transfer, then the request itself on the target


@dataclass(frozen=True, slots=True)
class TTFTEstimate:
    engine: EngineId
    recompute_s: float
    transfer: TransferOption | None = None  # the best transfer into this engine, if any

    @property
    def transfers(self) -> bool:
        """The transfer is expected to be faster than recomputing."""
        return self.transfer is not None and self.transfer.ttft_s < self.recompute_s

    @property
    def best_s(self) -> float:
        return self.transfer.ttft_s if self.transfer is not None and self.transfers else self.recompute_s


class TTFTEstimator:
    def __init__(
        self,
        cost_model: CostModel,
        *,
        layout: KVLayout,
        registry: EndpointRegistry | None = None,
        transfer_model: TransferCostModel | None = None,
        transfer_config: KVTransferConfig | None = None,
    ) -> None:
        self.cost_model = cost_model
        self.transfer_model = transfer_model or TransferCostModel()
        self._layout = layout
        self._registry = registry
        self._transfer_config = transfer_config

    @property
    def _block_size(self) -> int:
        return self._layout.block_size

    def refresh(self) -> None:
        """Bring the transfer cost model up to the engines' latest NIXL metrics."""
        if self.transfer_enabled and self._registry is not None:
            self.transfer_model.refresh_wire_time(self._registry.endpoints)

    @property
    def transfer_enabled(self) -> bool:
        return self._registry is not None and self._transfer_config is not None and self._transfer_config.enabled

    def cached_tokens(self, request: RoutingRequest, engine: EngineId) -> int:
        match = request.prefix_matches.get(engine)
        n = request.num_prompt_tokens or 0
        return cached_prefix_tokens(match.num_chunks, n, self._block_size) if match is not None else 0

    def estimate(self, request: RoutingRequest, target: Endpoint) -> TTFTEstimate:
        n = request.num_prompt_tokens or 0
        cached = self.cached_tokens(request, target.id)
        model = self.cost_model
        recompute = model.ttft_s(cached, n - cached, target.pending_prefill_s, target.load)
        return TTFTEstimate(target.id, recompute, self._best_transfer(request, target, cached))

    def _best_transfer(self, request: RoutingRequest, target: Endpoint, cached: int) -> TransferOption | None:
        if not self.transfer_enabled or not target.kv_transfer or not request.num_prompt_tokens:
            return None
        assert self._registry is not None and self._transfer_config is not None
        n = request.num_prompt_tokens
        model = self.cost_model
        best: TransferOption | None = None
        for holder in self._registry.transfer_sources(request.model):
            if holder.id == target.id:
                continue
            match = request.prefix_matches.get(holder.id)
            held_blocks = match.by_tier.get(TIER_GPU, 0) if match is not None else 0
            prefix = cached_prefix_tokens(held_blocks, n, self._block_size)
            moved = prefix - cached
            if moved < self._transfer_config.min_prefix_tokens:
                continue
            # The holder runs a 1-token request over its cached prefix: its queue, then ~a block.
            holder_turn = model.ttft_s(prefix - self._block_size, self._block_size, holder.pending_prefill_s, holder.load)
            transfer_s = holder_turn + self.transfer_model.seconds(moved)
            ttft = (
                max(target.pending_prefill_s, transfer_s)
                + model.overhead_s
                + model.interference_s * target.load
                + model.prefill_s(prefix, n - prefix)
            )
            if best is None or ttft < best.ttft_s:
                best = TransferOption(holder.id, prefix, moved, transfer_s, ttft)
        return best
