"""The load ledger: what each engine has from this gateway right now, as routing reads it.

Per engine: the requests in flight (shared with the other workers, gateway.endpoints.shared)
and the prefill seconds predicted for those of them with no first byte yet (what a new
request would queue behind: gateway.routing.ttft). Every request is one `Attempt` per engine
it is sent to: acquired before sending, out of the queue at its first byte, released at its
end, whatever the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.endpoints.registry import Endpoint
from gateway.kvindex.service import PrefixService
from gateway.metrics import GatewayMetrics
from gateway.proxy.transfer import CompletedTransfer
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel
from gateway.types import RoutingRequest, cached_prefix_tokens

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Attempt:
    """One request on its chosen engine."""

    endpoint: Endpoint
    predicted_cached: int | None  # cached tokens the engine should report (None: no prediction)
    prefill_s: float  # predicted engine time, counted in the engine's queue until first byte
    queued_s: float  # what it was predicted to wait behind
    running: float  # requests on the engine when it was sent
    transfer: CompletedTransfer | None = None  # KV moved to the engine before sending
    in_queue: bool = True
    released: bool = False


class LoadLedger:
    def __init__(
        self,
        prefix: PrefixService | None,
        cost_model: CostModel,
        metrics: GatewayMetrics,
        store_model: StoreLoadModel | None = None,
    ) -> None:
        self._prefix = prefix
        self._cost_model = cost_model
        self._metrics = metrics
        self._store_model = store_model or StoreLoadModel()

    def acquire(self, request: RoutingRequest, endpoint: Endpoint) -> Attempt:
        predicted, prefill_s = self._predicted_prefill(request, endpoint)
        attempt = Attempt(endpoint, predicted, prefill_s, queued_s=endpoint.pending_prefill_s, running=endpoint.load)
        endpoint.add_in_flight(1)
        endpoint.pending_prefill_s += prefill_s
        self._metrics.in_flight.labels(endpoint.id).set(endpoint.in_flight)
        return attempt

    def acquire_decode(self, endpoint: Endpoint) -> Attempt:
        """A disaggregated request's decode engine: it pulls the prompt's KV, computing none of
        it, so nothing joins its prefill queue (and no cached tokens are predicted there)."""
        attempt = Attempt(endpoint, None, 0.0, queued_s=endpoint.pending_prefill_s, running=endpoint.load)
        endpoint.add_in_flight(1)
        self._metrics.in_flight.labels(endpoint.id).set(endpoint.in_flight)
        return attempt

    def reprice(self, request: RoutingRequest, attempt: Attempt, transfer: CompletedTransfer) -> None:
        """After a transfer the engine holds more of the prompt: less to prefill."""
        attempt.transfer = transfer
        predicted, prefill_s = self._predicted_prefill(request, attempt.endpoint)
        if attempt.in_queue:
            pending = attempt.endpoint.pending_prefill_s - attempt.prefill_s + prefill_s
            attempt.endpoint.pending_prefill_s = max(0.0, pending)
        attempt.predicted_cached = predicted
        attempt.prefill_s = prefill_s

    def first_byte(self, attempt: Attempt) -> None:
        if attempt.in_queue:
            attempt.in_queue = False
            attempt.endpoint.pending_prefill_s = max(0.0, attempt.endpoint.pending_prefill_s - attempt.prefill_s)

    def release(self, attempt: Attempt) -> None:
        """Once per attempt: a second release would count a request the engine still has as
        gone, and routing would favour that engine for good."""
        if attempt.released:
            logger.error("engine %s: a request was released twice", attempt.endpoint.id, stack_info=True)
            return
        attempt.released = True
        self.first_byte(attempt)
        attempt.endpoint.add_in_flight(-1)
        self._metrics.in_flight.labels(attempt.endpoint.id).set(attempt.endpoint.in_flight)

    def _predicted_prefill(self, request: RoutingRequest, endpoint: Endpoint) -> tuple[int | None, float]:
        """(cached tokens the engine should report, its predicted prefill seconds)."""
        if self._prefix is None or request.num_prompt_tokens is None:
            return None, 0.0
        n = request.num_prompt_tokens
        predicted = self._prefix.predicted_cached_tokens(request, endpoint.id)
        prefill_s = self._cost_model.prefill_s(predicted, n - predicted)
        match = request.prefix_matches.get(endpoint.id)
        if match is not None and match.store_chunks > match.own_chunks:
            # The engine loads from its store what it does not hold itself: engine time too.
            own = cached_prefix_tokens(match.own_chunks, n, self._prefix.block_size)
            prefill_s += self._store_model.seconds(predicted - own)
        return predicted, prefill_s
