"""A cap on the requests a worker tokenizes and looks up at once (`limits.max_requests_routing`).

Routing a prompt is the gateway's own CPU work: tokenization (on the event loop, and in its
threads for much new text), chunk hashing, the index lookup. Everything after it waits on
engines. A worker offered more prompts than its core can route queues them here, and every
request's latency grows with the queue without bound: nothing else notices, as requests in
flight stay few (`max_concurrent_requests`) while the engines answer fast. Past the cap a
request gets 503 with `Retry-After` at once, before any tokenization, so the queue stays short
and the requests admitted keep their latency.

Measured (bench.overhead, 2k-token chats of which half continue a conversation, 200 req/s on a
core that routes ~190; the engines alone answer in 0.9 ms, p99 2 ms): no cap, latency p50 18 ms
and p99 137 ms, none refused; a cap of 4, p50 6 ms and p99 64 ms, 2 % refused with 503.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from gateway.errors import Overloaded


class RoutingSlots:
    def __init__(self, max_requests: int | None, retry_after_s: int, on_reject: Callable[[str], None]) -> None:
        """`max_requests` None: no cap. `on_reject` counts a refusal (by reason)."""
        self._max_requests = max_requests
        self._retry_after_s = retry_after_s
        self._on_reject = on_reject
        self.in_use = 0

    def __enter__(self) -> None:
        if self._max_requests is not None and self.in_use >= self._max_requests:
            self._on_reject("routing_backlog")
            raise Overloaded(
                "The gateway is receiving more prompts than it can route; retry shortly.",
                retry_after_s=self._retry_after_s,
            )
        self.in_use += 1

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.in_use -= 1
