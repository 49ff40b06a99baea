"""Passive health: take an engine out of rotation when the requests sent to it fail, without
waiting for the active checks, which a hung engine passes (vLLM's /health answers from its API
server even while its engine core is stopped).

An engine is ejected at once when a connection to it fails, it times out (no first byte, a
stream gone silent) or it says its engine core died, and after `consecutive_failures` failed answers in a row (5xx, a stream
cut mid-way). An ejection lasts `base_ejection_s`, doubled for each further ejection in a row
up to `max_ejection_s`. When it ends the circuit is half-open: one probe request (a 1-token
completion, through the same client as the traffic) must succeed before the engine takes
traffic again; if it fails, the engine is ejected again, for twice as long. Never more than
`max_ejected_fraction` of the engines are out at once.

An ejection for a timeout also ends the wait of every request still waiting for that engine's
first byte, so they are retried elsewhere instead of hanging until their own timeout.

Each gateway worker process judges for itself (the state is per process).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from gateway.config import OutlierDetectionConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.metrics import GatewayMetrics
from gateway.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Probe = Callable[[Endpoint, float], Awaitable[bool]]  # (engine, timeout_s) -> it served
# Reasons an engine is ejected at once; the first two mean it is hung, not refusing.
CONNECT_ERROR = "connect_error"
FIRST_BYTE_TIMEOUT = "first_byte_timeout"
STREAM_STALL = "stream_stall"
FAILED_ANSWERS = "failed_answers"
ENGINE_DEAD = "engine_dead"
_HUNG = frozenset({FIRST_BYTE_TIMEOUT, STREAM_STALL})
# Ejections a passing active check ends: the engine's server is back (refused connections) or
# was restarted (vLLM's /health answers 503 while its engine core is dead).
_LIFTED_BY_HEALTH_CHECKS = frozenset({CONNECT_ERROR, ENGINE_DEAD})


class OutlierDetector:
    def __init__(
        self,
        registry: EndpointRegistry,
        config: OutlierDetectionConfig | None = None,
        metrics: GatewayMetrics | None = None,
        probe: Probe | None = None,
    ) -> None:
        """Without `probe` (unit tests), an ejection simply ends when its time is up."""
        self._registry = registry
        self._config = config or OutlierDetectionConfig()
        self._metrics = metrics
        self._probe = probe
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def reconfigure(self, registry: EndpointRegistry, config: OutlierDetectionConfig) -> None:
        """A configuration reload: its engines and settings from now on."""
        self._registry = registry
        self._config = config

    def record_connect_failure(self, endpoint: Endpoint) -> bool:
        """Eject `endpoint`; returns False when the ejection cap keeps it in rotation."""
        return self._eject(endpoint, CONNECT_ERROR)

    def record_timeout(self, endpoint: Endpoint, reason: str) -> bool:
        """`reason`: FIRST_BYTE_TIMEOUT or STREAM_STALL. Ejects at once."""
        return self._eject(endpoint, reason)

    def record_engine_dead(self, endpoint: Endpoint) -> bool:
        """The engine says its core died (engine_adapter.errors). Ejects at once."""
        return self._eject(endpoint, ENGINE_DEAD)

    def record_failure(self, endpoint: Endpoint) -> bool:
        """A failed answer (5xx, a stream cut mid-way); ejects after enough in a row."""
        endpoint.consecutive_errors += 1
        if endpoint.consecutive_errors < self._config.consecutive_failures:
            return False
        return self._eject(endpoint, FAILED_ANSWERS)

    @staticmethod
    def record_success(endpoint: Endpoint) -> None:
        endpoint.consecutive_errors = 0

    def _eject(self, endpoint: Endpoint, reason: str) -> bool:
        now = time.monotonic()
        if endpoint.ejected_until > now:
            return True  # out already: concurrent requests saw the same fault
        ejected = sum(1 for e in self._registry.endpoints if e is not endpoint and e.ejected_until > now)
        if ejected + 1 > self._config.max_ejected_fraction * len(self._registry.endpoints):
            logger.warning("engine %s failed (%s) but stays in rotation: %d of %d engines are ejected already",
                           endpoint.id, reason, ejected, len(self._registry.endpoints))  # fmt: skip
            if self._metrics is not None:
                self._metrics.ejections_refused.labels(endpoint.id).inc()
            return False
        self._start_ejection(endpoint, reason, now)
        return True

    def _start_ejection(self, endpoint: Endpoint, reason: str, now: float, *, again: bool = False) -> None:
        """`again`: a failed probe keeps the engine out, so the ejection is one more in a row."""
        if not again and now - endpoint.restored_at > self._config.max_ejection_s:
            endpoint.num_ejections = 0  # in rotation long enough: forgiven
        endpoint.num_ejections += 1
        duration_s = min(self._config.max_ejection_s, self._config.base_ejection_s * 2 ** (endpoint.num_ejections - 1))
        endpoint.ejected_until = now + duration_s
        endpoint.ejection_reason = reason
        endpoint.consecutive_errors = 0
        logger.warning("engine %s ejected for %.1f s (%s, ejection %d in a row)",
                       endpoint.id, duration_s, reason, endpoint.num_ejections)  # fmt: skip
        if self._metrics is not None:
            self._metrics.ejections.labels(endpoint.id, reason).inc()
        if reason in _HUNG:
            for wait in list(endpoint.first_byte_waits):
                wait.reschedule(asyncio.get_running_loop().time())
        if self._probe is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no event loop (a synchronous test): the ejection ends by time
            previous = self._timers.pop(endpoint.id, None)
            if previous is not None:
                previous.cancel()
            self._timers[endpoint.id] = loop.call_later(duration_s, self._half_open, endpoint)

    def _half_open(self, endpoint: Endpoint) -> None:
        self._timers.pop(endpoint.id, None)
        if endpoint.ejected_until == 0.0:
            return  # lifted meanwhile (an active check saw a refused connection heal)
        endpoint.ejected_until = math.inf  # out of rotation until the probe answers
        task = asyncio.get_running_loop().create_task(self._probe_then_decide(endpoint), name=f"probe-{endpoint.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_then_decide(self, endpoint: Endpoint) -> None:
        assert self._probe is not None
        try:
            ok = await self._probe(endpoint, self._config.probe_timeout_s)
        except Exception:  # a probe that breaks must not leave the engine out for good
            logger.exception("probe of engine %s failed", endpoint.id)
            ok = False
        if self._metrics is not None:
            self._metrics.probes.labels(endpoint.id, "ok" if ok else "failed").inc()
        if ok:
            self.restore(endpoint)
        else:
            # Already counted as ejected: the cap does not apply to keeping it out.
            self._start_ejection(endpoint, endpoint.ejection_reason, time.monotonic(), again=True)

    def restore(self, endpoint: Endpoint) -> None:
        """Back in rotation (a probe succeeded, or an active check saw a refused connection heal)."""
        if endpoint.ejected_until == 0.0:
            return
        endpoint.ejected_until = 0.0
        endpoint.restored_at = time.monotonic()
        endpoint.consecutive_errors = 0
        logger.warning("engine %s back in rotation after its ejection (%s)", endpoint.id, endpoint.ejection_reason)

    def lift_after_health_check(self, endpoint: Endpoint) -> None:
        """A passing active check ends an ejection for a refused connection or a dead engine
        core (the engine is back), not one for a timeout or failed answers: a hung engine
        core passes /health."""
        if endpoint.ejection_reason in _LIFTED_BY_HEALTH_CHECKS and endpoint.ejected_until != math.inf:
            timer = self._timers.pop(endpoint.id, None)
            if timer is not None:
                timer.cancel()
            self.restore(endpoint)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await cancel_and_wait(self._tasks)
