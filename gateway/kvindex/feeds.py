"""One KV-event subscription per engine that publishes events, feeding the index.

Endpoints come from the config (`kv_events_endpoint`) or, for engines that list none, from
the engine's own `GET /kv_event_sources` (vLLM reports its publisher config per data-parallel
rank; a `tcp://*:port` bind address is resolved to the engine's host). A reload follows the
engines it adds and stops following those it removes (gateway.runtime).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import httpx
import zmq.asyncio

from engine_adapter.events.subscriber import EventSource, EventSubscriber, resolve_bind_address
from gateway.endpoints.registry import Endpoint
from gateway.kvindex.ingest import IndexIngestor

logger = logging.getLogger(__name__)


class EventFeeds:
    def __init__(self, ingestor: IndexIngestor, *, replay_timeout_s: float) -> None:
        self._ingestor = ingestor
        self._replay_timeout_s = replay_timeout_s
        self._context: zmq.asyncio.Context | None = None
        self.subscribers: dict[str, EventSubscriber] = {}

    async def discover(self, client: httpx.AsyncClient, endpoints: Iterable[Endpoint]) -> None:
        """Fill in event endpoints the config left out, from each engine's /kv_event_sources."""
        for endpoint in endpoints:
            if endpoint.kv_events_endpoint is not None:
                continue
            try:
                resp = await client.get(f"{endpoint.url}/kv_event_sources", timeout=2.0)
                sources = resp.json() if resp.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                continue
            # One publisher per data-parallel rank; rank 0 serves a single-rank engine.
            config = sources.get("0") if isinstance(sources, dict) else None
            if isinstance(config, dict) and config.get("publisher") == "zmq" and config.get("endpoint"):
                endpoint.kv_events_endpoint = resolve_bind_address(config["endpoint"], endpoint.url)
                replay = config.get("replay_endpoint")
                if replay and endpoint.kv_events_replay_endpoint is None:
                    endpoint.kv_events_replay_endpoint = resolve_bind_address(replay, endpoint.url)
                logger.info("engine %s publishes KV events on %s", endpoint.id, endpoint.kv_events_endpoint)

    def follow(self, endpoints: Iterable[Endpoint]) -> None:
        """Subscribe to the events of each of `endpoints` that publishes them (once each)."""
        for endpoint in endpoints:
            if endpoint.kv_events_endpoint is not None and endpoint.id not in self.subscribers:
                self._subscribe(endpoint)

    async def unfollow(self, engine_id: str) -> None:
        subscriber = self.subscribers.pop(engine_id, None)
        if subscriber is not None:
            await subscriber.stop()

    def _subscribe(self, endpoint: Endpoint) -> None:
        assert endpoint.kv_events_endpoint is not None
        if self._context is None:
            self._context = zmq.asyncio.Context()
        source = EventSource(endpoint.id, endpoint.kv_events_endpoint, endpoint.kv_events_replay_endpoint)
        subscriber = EventSubscriber(source, self._ingestor, self._context, replay_timeout_s=self._replay_timeout_s)
        subscriber.start()
        self.subscribers[endpoint.id] = subscriber

    async def stop(self) -> None:
        for subscriber in self.subscribers.values():
            await subscriber.stop()
        self.subscribers.clear()
        if self._context is not None:
            self._context.term()
            self._context = None
