"""Endpoints (one engine each) and the registry that knows their health, models and load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine_adapter.metrics import EngineStats
from gateway.config import EngineConfig
from gateway.endpoints.shared import SharedFleetState
from gateway.types import EngineId


@dataclass(slots=True, eq=False)
class Endpoint:
    id: EngineId
    url: str
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_capacity_blocks: int | None = None
    api_key: str | None = None
    # Runs vLLM's NixlConnector: can give and take cached KV (gateway.routing.ttft).
    kv_transfer: bool = False
    # Prefill/decode disaggregation: "prefill", "decode" or "both" (gateway.proxy.disaggregation).
    role: str = "both"
    # The shared KV store the engine loads from and writes to (gateway.kvindex.stores).
    kv_store: str | None = None
    # Models from the config; `discovered_models` comes from GET /v1/models.
    configured_models: frozenset[str] = frozenset()
    discovered_models: frozenset[str] = frozenset()
    # The engine's own /v1/models entries, served back to clients as they are.
    model_cards: tuple[dict[str, Any], ...] = ()
    healthy: bool = True
    # Operator-set: takes no new requests, finishes what it has.
    draining: bool = False
    # Joining: out of rotation until the fleet's hot prefixes are pulled into it (gateway.elastic).
    warming: bool = False
    in_flight: int = 0
    # Our in-flight count (all workers) when `stats` was scraped: the engine's numbers include those.
    in_flight_at_scrape: int = 0
    # Predicted prefill seconds of our requests sent here that have no first byte yet.
    pending_prefill_s: float = 0.0
    stats: EngineStats | None = None
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    # Passive health (gateway.endpoints.outlier). `ejected_until`: monotonic time; infinite
    # while the probe that ends an ejection runs (half-open).
    ejected_until: float = 0.0
    ejection_reason: str = ""
    num_ejections: int = 0  # in a row: each doubles the next ejection
    restored_at: float = 0.0
    consecutive_errors: int = 0  # failed answers in a row
    # Requests waiting for this engine's first byte: an ejection for a timeout ends the waits.
    first_byte_waits: set[asyncio.Timeout] = field(default_factory=set)
    # With several worker processes: their shared view of this engine (its column `shared_index`).
    shared: SharedFleetState | None = None
    shared_index: int = -1

    @classmethod
    def from_config(cls, config: EngineConfig) -> Endpoint:
        return cls(
            id=EngineId(config.name),
            url=config.url,
            kv_events_endpoint=config.kv_events_endpoint,
            kv_events_replay_endpoint=config.kv_events_replay_endpoint,
            kv_capacity_blocks=config.kv_capacity_blocks,
            api_key=config.api_key,
            kv_transfer=config.kv_transfer,
            role=config.role,
            kv_store=config.kv_store,
            configured_models=frozenset(config.models),
        )

    def reconfigure(self, running: EngineConfig, new: EngineConfig) -> bool:
        """A reload changed this engine's settings (same name and url: the same engine, whose
        health, load and cache stay known). True when its KV-event endpoints changed."""
        self.kv_capacity_blocks = new.kv_capacity_blocks
        self.api_key = new.api_key
        self.kv_transfer = new.kv_transfer
        self.role = new.role
        self.kv_store = new.kv_store
        self.configured_models = frozenset(new.models)
        events = (new.kv_events_endpoint, new.kv_events_replay_endpoint)
        if events == (running.kv_events_endpoint, running.kv_events_replay_endpoint):
            return False  # what discovery found for unset ones stays
        self.kv_events_endpoint, self.kv_events_replay_endpoint = events
        return True

    @property
    def models(self) -> frozenset[str]:
        return self.configured_models | self.discovered_models

    @property
    def is_draining(self) -> bool:
        """Drained here, or (several workers) by any worker's admin API."""
        return self.draining or (self.shared is not None and self.shared.draining(self.shared_index))

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        if self.shared is not None:
            self.shared.set_draining(self.shared_index, draining)

    def add_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        if self.shared is not None:
            self.shared.set_in_flight(self.shared_index, self.in_flight)

    def leave_shared(self) -> None:
        """It left this worker's configuration (a reload): the requests to it still under way
        are no longer counted in its column, which a later engine of that name may take."""
        if self.shared is not None:
            self.shared.set_in_flight(self.shared_index, 0)
            self.shared = None

    @property
    def total_in_flight(self) -> int:
        """Requests every worker of this gateway has in flight here."""
        return self.in_flight + (0 if self.shared is None else self.shared.others_in_flight(self.shared_index))

    def available(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.healthy and now >= self.ejected_until and not self.is_draining and not self.warming

    @property
    def capacity_blocks(self) -> int | None:
        if self.kv_capacity_blocks is not None:
            return self.kv_capacity_blocks
        return None if self.stats is None else self.stats.num_gpu_blocks

    @property
    def load(self) -> float:
        """Requests on the engine: this gateway's in-flight count, all workers (always current),
        plus the requests others sent it (other gateways, direct clients), from its last
        scrape, i.e. what the engine reported beyond what we had in flight at that moment."""
        in_flight = self.total_in_flight
        if self.stats is None:
            return float(in_flight)
        engine_view = self.stats.num_requests_running + self.stats.num_requests_waiting
        return in_flight + max(0.0, engine_view - self.in_flight_at_scrape)


@dataclass(slots=True)
class EndpointRegistry:
    endpoints: list[Endpoint] = field(default_factory=list)

    @classmethod
    def from_config(cls, engines: Iterable[EngineConfig]) -> EndpointRegistry:
        return cls([Endpoint.from_config(e) for e in engines])

    def get(self, engine_id: str) -> Endpoint | None:
        for endpoint in self.endpoints:
            if endpoint.id == engine_id:
                return endpoint
        return None

    def known_models(self) -> set[str]:
        """Every model any engine serves or was configured for, healthy or not."""
        models: set[str] = set()
        for endpoint in self.endpoints:
            models |= endpoint.models
        return models

    def model_cards(self) -> list[dict[str, Any]]:
        """One card per model that an available engine serves (the first engine's card)."""
        now = time.monotonic()
        cards: dict[str, dict[str, Any]] = {}
        for endpoint in self.endpoints:
            if not endpoint.available(now):
                continue
            for card in endpoint.model_cards:
                cards.setdefault(card["id"], card)
            for model in endpoint.configured_models:
                cards.setdefault(model, {"id": model, "object": "model", "created": 0, "owned_by": "vllm"})
        return [cards[m] for m in sorted(cards)]

    def base_model(self, model: str) -> tuple[str, str | None]:
        """(base model, LoRA adapter or None): vLLM lists adapters with their base as parent."""
        for endpoint in self.endpoints:
            for card in endpoint.model_cards:
                if card.get("id") == model and card.get("parent"):
                    return str(card["parent"]), model
        return model, None

    def store_of(self, engine_id: str) -> str | None:
        """The shared KV store `engine_id` is attached to, if any."""
        endpoint = self.get(engine_id)
        return None if endpoint is None else endpoint.kv_store

    def store_attachments(self) -> list[tuple[EngineId, str]]:
        """(engine, store) for every engine attached to a shared KV store."""
        return [(e.id, e.kv_store) for e in self.endpoints if e.kv_store is not None]

    def model_of(self, engine_id: str) -> str | None:
        """The (first) base model an engine serves: the root of its event chains."""
        endpoint = self.get(engine_id)
        if endpoint is None:
            return None
        for card in endpoint.model_cards:
            if not card.get("parent"):
                return str(card["id"])
        return min(endpoint.configured_models) if endpoint.configured_models else None

    def candidates_any(self) -> Sequence[Endpoint]:
        now = time.monotonic()
        return [e for e in self.endpoints if e.available(now)]

    def reachable(self) -> Sequence[Endpoint]:
        """Engines that can answer about work they already hold (a stored response):
        healthy and not ejected. Draining ones too: a drain finishes what the engine has."""
        now = time.monotonic()
        return [e for e in self.endpoints if e.healthy and now >= e.ejected_until]

    def transfer_sources(self, model: str) -> Sequence[Endpoint]:
        """Engines that can hand over KV they hold for `model`. A draining engine can: it takes
        no new requests, but giving away its cache is how its prefixes survive the drain."""
        now = time.monotonic()
        return [
            e for e in self.endpoints
            if e.kv_transfer and model in e.models and e.healthy and now >= e.ejected_until
        ]  # fmt: skip

    def candidates(self, model: str, excluded: Iterable[str] = ()) -> Sequence[Endpoint]:
        now = time.monotonic()
        skip = set(excluded)
        return [e for e in self.endpoints if model in e.models and e.id not in skip and e.available(now)]
