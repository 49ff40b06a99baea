"""The store-load model (gateway.routing.store_model) and its calibration from what engines
report (gateway.proxy.feedback)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU, TIER_STORAGE, PrefixMatch
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.service import PrefixService
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.metrics import GatewayMetrics
from gateway.proxy.feedback import PredictionFeedback
from gateway.proxy.ledger import Attempt
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel, StorePrior
from gateway.tokenization.tokenizer import PromptTokenizer
from gateway.types import EngineId, RequestChunkKey, RoutingRequest

BLOCK = 16


def test_uncalibrated_model_reproduces_its_prior() -> None:
    prior = StorePrior()
    model = StoreLoadModel(prior)
    assert model.seconds(0) == 0.0  # nothing to load costs nothing
    assert model.seconds(8192) == pytest.approx(prior.fixed_s + prior.per_token_s * 8192, rel=0.01)
    assert model.describe()["num_samples"] == 0


def test_calibration_moves_toward_observed_loads() -> None:
    model = StoreLoadModel()
    prior_s, observed_s = model.seconds(8192), 0.010 + 2e-5 * 8192
    for _ in range(20):
        for tokens in (1024, 2048, 4096, 8192):
            model.observe(tokens, 0.010 + 2e-5 * tokens, ttft_s=0.5, queued_s=0.0)
    # A store four times slower than the prior: the estimate follows it (the prior, which
    # never fades, still pulls a little).
    assert prior_s < model.seconds(8192) < observed_s
    assert observed_s - model.seconds(8192) < 0.2 * (observed_s - prior_s)
    assert model.num_samples == 80
    # And back, toward a store as fast as a local hit.
    for _ in range(40):
        for tokens in (1024, 8192):
            model.observe(tokens, 0.0, ttft_s=0.1, queued_s=0.0)
    assert model.seconds(8192) < prior_s


def test_requests_that_waited_or_loaded_nothing_teach_nothing() -> None:
    model = StoreLoadModel()
    model.observe(4096, 1.0, ttft_s=2.0, queued_s=1.0)  # mostly queueing
    model.observe(0, 1.0, ttft_s=2.0, queued_s=0.0)
    assert model.num_samples == 0


# --- feedback: which model an answered request calibrates -----------------------------------------


class NoTokenizers:
    def for_model(self, model: str) -> PromptTokenizer:
        raise AssertionError("not used")


def feedback(engine: Endpoint) -> tuple[PredictionFeedback, CostModel, StoreLoadModel]:
    cost, store = CostModel(), StoreLoadModel()
    prefix = PrefixService(InMemoryIndex(), NoTokenizers(), EndpointRegistry([engine]), WorkingSetTracker(),
                           KVLayout(BLOCK), speculative_ttl_s=5, approximate_ttl_s=60)  # fmt: skip
    return PredictionFeedback(cost, GatewayMetrics(CollectorRegistry()), prefix, store), cost, store


def answered(match: PrefixMatch, n: int = 4096) -> RoutingRequest:
    return RoutingRequest(model="m", api_path="/v1/completions", body={}, headers={}, request_id="r", stream=True,
                          num_prompt_tokens=n, chunk_keys=[RequestChunkKey(k) for k in range(1, n // BLOCK + 1)],
                          prefix_matches={EngineId("a"): match})  # fmt: skip


def usage(cached: int, prompt: int = 4096) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": cached}}


def test_a_store_load_calibrates_the_store_model_not_the_cost_model() -> None:
    engine = Endpoint(EngineId("a"), "http://a", configured_models=frozenset({"m"}), kv_store="s")
    fb, cost, store = feedback(engine)
    request = answered(PrefixMatch(num_chunks=200, by_tier={TIER_STORAGE: 200, TIER_GPU: 50}))
    attempt = Attempt(engine, predicted_cached=3200, prefill_s=0.1, queued_s=0.0, running=0)
    local_s = cost.ttft_s(3200, 896, 0.0, 0)
    fb.observe(request, attempt, usage(3200), local_s + 0.5)  # a slow store: 0.5 s for 2,400 tokens
    assert store.num_samples == 1 and cost.num_samples == 0
    assert store.seconds(2400) > StoreLoadModel().seconds(2400)


def test_a_local_hit_calibrates_the_cost_model() -> None:
    engine = Endpoint(EngineId("a"), "http://a", configured_models=frozenset({"m"}), kv_store="s")
    fb, cost, store = feedback(engine)
    # The engine served only its own 50 chunks (the store had evicted the rest): nothing loaded.
    request = answered(PrefixMatch(num_chunks=200, by_tier={TIER_STORAGE: 200, TIER_GPU: 50}))
    attempt = Attempt(engine, predicted_cached=3200, prefill_s=0.1, queued_s=0.0, running=0)
    fb.observe(request, attempt, usage(800), 0.3)
    assert cost.num_samples == 1 and store.num_samples == 0
