"""Passive health: eject an engine the proxy could not reach, for a while, without waiting
for the next active check. A passing active check lifts the ejection early."""

from __future__ import annotations

import time

from gateway.endpoints.registry import Endpoint, EndpointRegistry


class OutlierDetector:
    def __init__(self, registry: EndpointRegistry, base_ejection_s: float = 5.0, max_ejected_fraction: float = 1.0):
        self._registry = registry
        self._base_ejection_s = base_ejection_s
        self._max_ejected_fraction = max_ejected_fraction

    def record_connect_failure(self, endpoint: Endpoint) -> bool:
        """Eject `endpoint`; returns False when the ejection cap keeps it in rotation."""
        now = time.monotonic()
        ejected = sum(1 for e in self._registry.endpoints if e.ejected_until > now)
        if (ejected + 1) > self._max_ejected_fraction * len(self._registry.endpoints):
            return False
        endpoint.ejected_until = now + self._base_ejection_s
        return True
