"""Estimated time to first token of one request on one engine, per way of serving it there:

    own hit    = overhead + queue(target) + d·load(target) + prefill(c_own, n − c_own)
    store load = overhead + queue(target) + d·load(target) + load(c_store − c_own)
                 + prefill(c_store, n − c_store)
    peer pull  = max(queue(target), holder's turn + move(P − c_own))
                 + overhead + d·load(target) + prefill(P, n − P)
    recompute  = overhead + queue(target) + d·load(target) + prefill(0, n)

c_own is the prefix the engine holds itself, c_store what it reaches with its shared store's
run (gateway.kvindex.stores: the store answers from the prompt's start, so that is
max(own run, store run)), P the block-aligned prefix a peer holds in its own KV cache
(confirmed by its events; never the prompt's last token), moved over NIXL
(engine_adapter.transfer). The queue on the target drains while the transfer runs, hence the
max. "Waiting for the busy holder" is the holder's own estimate: the kv_aware scorer compares
engines, so those options meet there.

Only what the gateway can make happen is chosen. Sent to an engine, vLLM takes its own hit,
then asks its store connector for what follows: the engine's own way is the store load when
its store reaches further than its own cache (whatever it costs), else its own hit, else
recomputing everything. The one thing the gateway adds is the peer pull
(gateway.proxy.transfer), chosen when it beats the engine's own way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config import KVTransferConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU
from gateway.kvindex.layout import KVLayout
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel
from gateway.routing.transfer_model import TransferCostModel
from gateway.types import EngineId, RoutingRequest, cached_prefix_tokens

Option = Literal["own_hit", "store_load", "peer_pull", "recompute"]
OPTIONS: tuple[Option, ...] = ("own_hit", "store_load", "peer_pull", "recompute")


@dataclass(frozen=True, slots=True)
class TransferOption:
    source: EngineId
    prefix_tokens: int  # P: what the target holds once the transfer is done
    moved_tokens: int  # P minus what the target held itself
    transfer_s: float  # the holder's turn plus the move
    ttft_s: float  # transfer, then the request itself on the target


@dataclass(frozen=True, slots=True)
class StoreLoadOption:
    cached_tokens: int  # what the engine serves from cache: its own prefix, then the store's
    loaded_tokens: int  # of those, the ones it loads from the store
    load_s: float
    ttft_s: float


@dataclass(frozen=True, slots=True)
class TTFTEstimate:
    engine: EngineId
    recompute_s: float  # nothing from any cache
    own_hit_s: float | None = None  # None: the engine holds none of the prefix itself
    store_load: StoreLoadOption | None = None  # None: its store reaches no further than its own cache
    transfer: TransferOption | None = None  # the best pull from a peer into this engine, if any

    @property
    def local(self) -> tuple[Option, float]:
        """What the engine does by itself when sent the request, and its estimate."""
        if self.store_load is not None:
            return "store_load", self.store_load.ttft_s
        if self.own_hit_s is not None:
            return "own_hit", self.own_hit_s
        return "recompute", self.recompute_s

    @property
    def local_s(self) -> float:
        return self.local[1]

    @property
    def transfers(self) -> bool:
        """The peer pull is expected to be faster than the engine's own way."""
        return self.transfer is not None and self.transfer.ttft_s < self.local_s

    @property
    def chosen(self) -> Option:
        return "peer_pull" if self.transfers else self.local[0]

    @property
    def best_s(self) -> float:
        return self.transfer.ttft_s if self.transfer is not None and self.transfers else self.local_s

    def options_s(self) -> dict[Option, float | None]:
        """Every option's estimate; None for the ones the engine lacks."""
        return {
            "own_hit": self.own_hit_s,
            "store_load": self.store_load.ttft_s if self.store_load is not None else None,
            "peer_pull": self.transfer.ttft_s if self.transfer is not None else None,
            "recompute": self.recompute_s,
        }


class TTFTEstimator:
    def __init__(
        self,
        cost_model: CostModel,
        *,
        layout: KVLayout,
        registry: EndpointRegistry | None = None,
        transfer_model: TransferCostModel | None = None,
        transfer_config: KVTransferConfig | None = None,
        store_model: StoreLoadModel | None = None,
    ) -> None:
        self.cost_model = cost_model
        self.transfer_model = transfer_model or TransferCostModel()
        self.store_model = store_model or StoreLoadModel()
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

    def cached_tokens(self, request: RoutingRequest, engine: EngineId) -> tuple[int, int]:
        """(tokens the engine holds itself, tokens it serves from cache with its store's)."""
        match = request.prefix_matches.get(engine)
        n = request.num_prompt_tokens or 0
        if match is None:
            return 0, 0
        own = cached_prefix_tokens(match.own_chunks, n, self._block_size)
        return own, max(own, cached_prefix_tokens(match.num_chunks, n, self._block_size))

    def estimate(self, request: RoutingRequest, target: Endpoint) -> TTFTEstimate:
        n = request.num_prompt_tokens or 0
        own, reached = self.cached_tokens(request, target.id)
        model = self.cost_model
        queued, running = target.pending_prefill_s, target.load
        own_hit = model.ttft_s(own, n - own, queued, running) if own > 0 else None
        store = None
        if reached > own:
            load_s = self.store_model.seconds(reached - own)
            ttft = load_s + model.ttft_s(reached, n - reached, queued, running)
            store = StoreLoadOption(reached, reached - own, load_s, ttft)
        return TTFTEstimate(
            target.id,
            recompute_s=model.ttft_s(0, n, queued, running),
            own_hit_s=own_hit,
            store_load=store,
            transfer=self._best_transfer(request, target, own, reached),
        )

    def _best_transfer(
        self, request: RoutingRequest, target: Endpoint, own: int, reached: int
    ) -> TransferOption | None:
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
            # Worth it only beyond what the target reaches by itself (its store included); the
            # pull then imports all the target lacks on its device.
            if prefix - reached < self._transfer_config.min_prefix_tokens:
                continue
            moved = prefix - own
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
