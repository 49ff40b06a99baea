"""The transfer option of the TTFT estimate (gateway.routing.ttft) and its cost model."""

from __future__ import annotations

import pytest

from engine_adapter.metrics import EngineStats
from gateway.kvindex.layout import KVLayout
from gateway.config import KVTransferConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU, TIER_SPECULATIVE, TIER_STORAGE, PrefixMatch
from gateway.routing.base import ScorerContext, ScorerParams
from gateway.routing.cost_model import CostModel
from gateway.routing.scorers.kv_aware import KVAwareScorer
from gateway.routing.transfer_model import TransferCostModel, TransferPrior
from gateway.routing.ttft import TTFTEstimator
from gateway.types import EngineId, RequestChunkKey, RoutingRequest

BLOCK = 32


def engine(name: str, *, kv_transfer: bool = True, pending_s: float = 0.0, in_flight: int = 0) -> Endpoint:
    return Endpoint(id=EngineId(name), url=f"http://{name}", configured_models=frozenset({"m"}),
                    kv_transfer=kv_transfer, pending_prefill_s=pending_s, in_flight=in_flight)  # fmt: skip


def request(num_tokens: int, matches: dict[str, PrefixMatch]) -> RoutingRequest:
    return RoutingRequest(model="m", api_path="/v1/completions", body={}, headers={}, request_id="r",
                          num_prompt_tokens=num_tokens, token_ids=list(range(num_tokens)),
                          chunk_keys=[RequestChunkKey(k) for k in range(1, num_tokens // BLOCK + 1)],
                          prefix_matches={EngineId(e): m for e, m in matches.items()})  # fmt: skip


def gpu(chunks: int) -> PrefixMatch:
    return PrefixMatch(num_chunks=chunks, by_tier={TIER_GPU: chunks})


def estimator(*engines: Endpoint, **config: object) -> TTFTEstimator:
    return TTFTEstimator(CostModel(), layout=KVLayout(BLOCK), registry=EndpointRegistry(list(engines)),
                         transfer_config=KVTransferConfig(**config))  # type: ignore[arg-type]  # fmt: skip


def test_transfer_beats_recomputing_a_long_prefix_on_the_target() -> None:
    holder, target = engine("a", in_flight=4), engine("b")
    est = estimator(holder, target)
    req = request(8192, {"a": gpu(250)})
    on_target = est.estimate(req, target)
    assert on_target.transfer is not None and on_target.transfers
    option = on_target.transfer
    assert option.source == "a" and option.prefix_tokens == 250 * BLOCK and option.moved_tokens == 250 * BLOCK
    assert option.ttft_s < on_target.recompute_s and on_target.best_s == option.ttft_s
    assert est.estimate(req, holder).transfer is None  # nobody holds more than the holder itself


def test_a_draining_holder_gives_its_cache_to_the_engine_that_serves() -> None:
    holder, target = engine("a"), engine("b")
    holder.draining = True
    est = estimator(holder, target)
    req = request(8192, {"a": gpu(250)})
    option = est.estimate(req, target).transfer
    assert option is not None and option.source == "a"
    scorer = KVAwareScorer(ScorerParams(), ScorerContext(layout=KVLayout(BLOCK), ttft_estimator=est))
    assert est.estimate(req, target).transfers and scorer.score(req, [target]) == {"b": 1.0}


def test_the_holders_queue_delays_the_transfer_too() -> None:
    # The holder serves the transfer's first step like any request: behind a 3 s queue it is
    # faster to recompute on the idle target.
    holder, target = engine("a", pending_s=3.0, in_flight=4), engine("b")
    estimate = estimator(holder, target).estimate(request(8192, {"a": gpu(250)}), target)
    assert estimate.transfer is not None and estimate.transfer.transfer_s > 3.0
    assert not estimate.transfers and estimate.best_s == estimate.recompute_s


def test_waiting_for_a_lightly_loaded_holder_beats_moving_its_cache() -> None:
    holder, target = engine("a", in_flight=2), engine("b")
    est = estimator(holder, target)
    req = request(8192, {"a": gpu(250)})
    scores = KVAwareScorer(ScorerParams(), ScorerContext(layout=KVLayout(BLOCK), ttft_estimator=est)).score(req, [holder, target])
    assert scores["a"] == 1.0 and scores["b"] < 1.0


def test_moved_prefix_is_block_aligned_and_never_the_last_prompt_token() -> None:
    holder, target = engine("a"), engine("b")
    req = request(64 * BLOCK, {"a": gpu(64), "b": gpu(10)})  # the holder has the whole prompt
    option = estimator(holder, target, min_prefix_tokens=1).estimate(req, target).transfer
    assert option is not None
    assert option.prefix_tokens == 63 * BLOCK  # (n - 1) // block blocks
    assert option.moved_tokens == 53 * BLOCK  # what the target lacks


@pytest.mark.parametrize(
    "case",
    ["disabled", "short", "target_without_connector", "holder_without_connector", "holder_unhealthy", "speculative_only"],
)
def test_no_transfer_option(case: str) -> None:
    holder = engine("a", kv_transfer=case != "holder_without_connector", pending_s=5.0)
    holder.healthy = case != "holder_unhealthy"
    target = engine("b", kv_transfer=case != "target_without_connector")
    chunks = 10 if case == "short" else 200  # 320 tokens < min_prefix_tokens 512
    match = PrefixMatch(num_chunks=chunks, by_tier={TIER_SPECULATIVE: chunks}) if case == "speculative_only" else gpu(chunks)
    est = estimator(holder, target, enabled=case != "disabled")
    assert est.estimate(request(8192, {"a": match}), target).transfer is None


def test_an_idle_holder_is_not_worth_a_transfer() -> None:
    # Same prefix, holder idle: serving on the holder beats transferring to an idle target.
    holder, target = engine("a"), engine("b")
    est = estimator(holder, target)
    req = request(8192, {"a": gpu(250)})
    assert est.estimate(req, holder).best_s < est.estimate(req, target).best_s


def test_picks_the_holder_with_the_longest_prefix() -> None:
    a, b, target = engine("a"), engine("b"), engine("c")
    option = estimator(a, b, target).estimate(request(8192, {"a": gpu(100), "b": gpu(200)}), target).transfer
    assert option is not None and option.source == "b"


def test_transfer_model_learns_fixed_and_per_token_cost() -> None:
    model = TransferCostModel()
    assert model.seconds(0) == pytest.approx(TransferPrior().fixed_s, rel=0.01)
    for _ in range(20):
        for tokens in (1024, 2048, 4096, 8192):
            model.observe(EngineId("b"), tokens, 0.012 + 1e-6 * tokens)
    assert model.fixed_s == pytest.approx(0.012, rel=0.3)  # the prior (30 ms) still pulls a little
    assert model.seconds(6000) == pytest.approx(0.012 + 0.006, rel=0.1)


def test_transfer_model_takes_wire_time_from_the_engines_nixl_metrics() -> None:
    model = TransferCostModel(TransferPrior(per_token_s=1e-7))
    target = engine("b")
    target.stats = EngineStats(nixl_xfer_seconds=5.0)  # before our transfers: not ours
    model.about_to_move(target)
    model.observe(target.id, 10_000, 0.05)
    target.stats = EngineStats(nixl_xfer_seconds=5.0 + 0.04)  # 40 ms on the wire for 10k tokens
    model.refresh_wire_time([target])
    assert model.describe()["wire_per_token_s"] == pytest.approx(4e-6)
    assert model.per_token_s >= 4e-6
    target.stats = EngineStats(nixl_xfer_seconds=0.01)  # restarted: counters from zero
    model.refresh_wire_time([target])
    assert model.per_token_s >= 0.0


def test_a_pull_competes_with_what_the_targets_store_gives_it() -> None:
    holder, target = engine("a"), engine("b")
    holder.draining = True
    est = estimator(holder, target)
    # The target's store has 100 chunks, the holder's GPU 250: the pull moves all the target
    # lacks on its device, and is weighed against loading the 100 and recomputing the rest.
    req = request(8192, {"a": gpu(250), "b": PrefixMatch(num_chunks=100, by_tier={TIER_STORAGE: 100})})
    estimate = est.estimate(req, target)
    assert estimate.transfer is not None and estimate.transfer.moved_tokens == 250 * BLOCK
    assert estimate.store_load is not None and estimate.store_load.loaded_tokens == 100 * BLOCK
    assert estimate.chosen == "peer_pull" and estimate.best_s == estimate.transfer.ttft_s < estimate.store_load.ttft_s
    # A store that reaches as far as the holder leaves nothing worth pulling.
    req = request(8192, {"a": gpu(250), "b": PrefixMatch(num_chunks=250, by_tier={TIER_STORAGE: 250})})
    estimate = est.estimate(req, target)
    assert estimate.transfer is None and estimate.chosen == "store_load"
