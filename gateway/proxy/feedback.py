"""What the engine reported about a finished request, fed back: the cost model (or, for a
request that loaded part of its prefix from a shared store, the store-load model) learns from
its time to first token, and the gateway's prediction of its cached tokens is checked (the
`gateway_cached_tokens_*` metrics)."""

from __future__ import annotations

from typing import Any

from gateway.kvindex.service import PrefixService
from gateway.metrics import GatewayMetrics
from gateway.proxy.ledger import Attempt
from gateway.proxy.usage import cached_tokens
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel
from gateway.types import RoutingRequest, cached_prefix_tokens


class PredictionFeedback:
    def __init__(
        self,
        cost_model: CostModel,
        metrics: GatewayMetrics,
        prefix: PrefixService | None,
        store_model: StoreLoadModel | None = None,
    ) -> None:
        self._cost_model = cost_model
        self._store_model = store_model or StoreLoadModel()
        self._metrics = metrics
        self._prefix = prefix  # None: the gateway predicts nothing (no prefix routing)

    def observe(self, request: RoutingRequest, attempt: Attempt, usage: dict[str, Any] | None, ttft_s: float) -> None:
        actual = cached_tokens(usage)
        if usage is None or actual is None:
            return
        prompt_tokens = usage.get("prompt_tokens")
        if isinstance(prompt_tokens, int):
            # Time to first byte is time to first token only when streaming, or for one token;
            # after a transfer it also holds the transfer (timed and calibrated on its own).
            if (request.stream or usage.get("completion_tokens") == 1) and attempt.transfer is None:
                self._observe_ttft(request, attempt, actual, prompt_tokens, ttft_s)
        if attempt.predicted_cached is None or self._prefix is None:
            return
        engine = attempt.endpoint.id
        m = self._metrics
        m.predicted_cached_tokens.labels(engine).inc(attempt.predicted_cached)
        m.engine_cached_tokens.labels(engine).inc(actual)
        if isinstance(prompt_tokens, int):
            m.prompt_tokens.labels(engine).inc(prompt_tokens)
        error = actual - attempt.predicted_cached
        m.prediction_error.observe(error)
        if error >= self._prefix.block_size:
            self._prefix.learn_reported(request, engine, actual)
        elif error <= -self._prefix.block_size:
            self._prefix.learn_store_miss(request, engine, actual)
        block = self._prefix.block_size
        verdict = "within_one_block" if abs(error) <= block else ("under" if error > 0 else "over")
        m.predictions.labels(verdict).inc()

    def _observe_ttft(
        self, request: RoutingRequest, attempt: Attempt, actual: int, prompt_tokens: int, ttft_s: float
    ) -> None:
        loaded = self._loaded_from_store(request, attempt, actual)
        if loaded <= 0:
            self._cost_model.observe(actual, prompt_tokens, ttft_s, attempt.queued_s, attempt.running)
            return
        # Its time beyond a local hit on all it reported cached is the load's (the cost model
        # would otherwise take a load for a slow local hit).
        local_s = self._cost_model.ttft_s(actual, max(0, prompt_tokens - actual), attempt.queued_s, attempt.running)
        self._store_model.observe(loaded, ttft_s - local_s, ttft_s, attempt.queued_s)

    def _loaded_from_store(self, request: RoutingRequest, attempt: Attempt, actual: int) -> int:
        """Tokens the engine loaded from its store: what it reported cached beyond what it
        holds itself, up to the store's run (more than that, it held more than the index knew)."""
        match = request.prefix_matches.get(attempt.endpoint.id)
        n = request.num_prompt_tokens
        if self._prefix is None or match is None or match.store_chunks == 0 or n is None:
            return 0
        own = cached_prefix_tokens(match.own_chunks, n, self._prefix.block_size)
        reached = cached_prefix_tokens(match.num_chunks, n, self._prefix.block_size)
        return max(0, min(actual, reached) - own)
