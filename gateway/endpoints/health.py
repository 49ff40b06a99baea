"""Active health checks: poll each engine's /health, /v1/models and /metrics in the background.

An engine leaves rotation after `unhealthy_threshold` failed checks (of /health and /v1/models;
/metrics is load information and its failures only keep the last scrape) in a row and comes back
after `healthy_threshold` passing ones. Passive ejection (failures the proxy sees) lives in
`gateway.endpoints.outlier`; a passing active check ends only an ejection for a refused
connection: a hung engine core still passes /health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from engine_adapter.metrics import parse_engine_metrics
from gateway.config import HealthConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class HealthChecker:
    def __init__(
        self,
        registry: EndpointRegistry,
        client: httpx.AsyncClient,
        config: HealthConfig,
        on_change: Callable[[Endpoint], None] | None = None,
        on_restart: Callable[[Endpoint], None] | None = None,
        on_pass: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """`on_pass`: each passing check (outlier detection may end an ejection)."""
        self._registry = registry
        self._client = client
        self._config = config
        self._on_change = on_change
        self._on_restart = on_restart
        self._on_pass = on_pass
        self._task: asyncio.Task[None] | None = None

    def watch(self, registry: EndpointRegistry, config: HealthConfig) -> None:
        """A reload: these engines and settings from the next round on. An engine no longer
        in `registry` is checked no more (a round under way finishes its check)."""
        self._registry = registry
        self._config = config

    async def check_all(self, *, initial: bool = False) -> None:
        """`initial`: the round before serving, where one failure is enough to start an
        engine out of rotation (nothing is known about it yet)."""
        await asyncio.gather(*(self.check(e, initial=initial) for e in self._registry.endpoints))

    async def check(self, endpoint: Endpoint, *, initial: bool = False) -> None:
        try:
            health = await self._get(endpoint, "/health")
            health.raise_for_status()
            models = await self._get(endpoint, "/v1/models")
            models.raise_for_status()
        except (httpx.HTTPError, OSError) as exc:
            self._record(endpoint, ok=False, reason=f"{type(exc).__name__}: {exc}", initial=initial)
            return
        try:
            metrics: httpx.Response | None = await self._get(endpoint, "/metrics")
        except (httpx.HTTPError, OSError) as exc:
            # Load information, not liveness: CPU vLLM can take seconds to answer /metrics
            # while it generates (seen here with 4 decoding requests). Keep the last scrape.
            logger.debug("engine %s: /metrics not scraped (%s)", endpoint.id, exc)
            metrics = None
        try:
            cards = tuple(m for m in models.json()["data"] if isinstance(m.get("id"), str))
            endpoint.model_cards = cards
            endpoint.discovered_models = frozenset(m["id"] for m in cards)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._record(endpoint, ok=False, reason="malformed /v1/models")
            return
        if metrics is not None and metrics.status_code == 200:
            try:
                stats = parse_engine_metrics(metrics.text)
            except ValueError:
                logger.warning("engine %s: unparsable /metrics", endpoint.id)
            else:
                previous = endpoint.stats
                endpoint.stats = stats
                endpoint.in_flight_at_scrape = endpoint.total_in_flight
                if (previous is not None and previous.process_start_time is not None
                        and stats.process_start_time != previous.process_start_time):  # fmt: skip
                    logger.warning("engine %s restarted", endpoint.id)
                    if self._on_restart is not None:
                        self._on_restart(endpoint)
        self._record(endpoint, ok=True)

    async def _get(self, endpoint: Endpoint, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        url = f"{endpoint.url}{path}"
        try:
            return await self._client.get(url, headers=headers, timeout=self._config.timeout_s)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # A pooled keep-alive connection the engine had just closed: one fresh try.
            return await self._client.get(url, headers=headers, timeout=self._config.timeout_s)

    def _record(self, endpoint: Endpoint, *, ok: bool, reason: str = "", initial: bool = False) -> None:
        was_healthy = endpoint.healthy
        if ok:
            endpoint.consecutive_failures = 0
            endpoint.consecutive_successes += 1
            if self._on_pass is not None:
                self._on_pass(endpoint)
            if not endpoint.healthy and endpoint.consecutive_successes >= self._config.healthy_threshold:
                endpoint.healthy = True
        else:
            endpoint.consecutive_successes = 0
            endpoint.consecutive_failures += 1
            threshold = 1 if initial else self._config.unhealthy_threshold
            if endpoint.healthy and endpoint.consecutive_failures >= threshold:
                endpoint.healthy = False
        if endpoint.healthy != was_healthy:
            state = "back in rotation" if endpoint.healthy else f"out of rotation ({reason})"
            logger.warning("engine %s %s", endpoint.id, state)
            if self._on_change is not None:
                self._on_change(endpoint)

    async def _run(self) -> None:
        # The first round ran before serving (see gateway.app); the loop starts with a pause.
        while True:
            await asyncio.sleep(self._config.interval_s)
            try:
                await self.check_all()
            except Exception:  # never let the checker die; log and keep polling
                logger.exception("health check round failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="health-checker")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
