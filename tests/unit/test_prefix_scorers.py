from __future__ import annotations

import pytest

from gateway.kvindex.layout import KVLayout
from gateway.endpoints.registry import Endpoint
from gateway.kvindex.base import TIER_CPU, TIER_GPU, TIER_SPECULATIVE, TIER_STORAGE, PrefixMatch
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.routing.base import SCORERS, ScorerContext, ScorerParams
from gateway.routing.cost_model import CostModel
from gateway.routing.scorers.capacity import CapacityParams, CapacityScorer
from gateway.routing.scorers.kv_aware import KVAwareScorer
from gateway.routing.scorers.prefix import PrefixParams, PrefixScorer
from gateway.types import EngineId, RequestChunkKey, RoutingRequest

BLOCK = 16


def endpoint(name: str, in_flight: int = 0, capacity: int | None = None, pending_s: float = 0.0) -> Endpoint:
    return Endpoint(id=EngineId(name), url=f"http://{name}", configured_models=frozenset({"m"}), in_flight=in_flight,
                    kv_capacity_blocks=capacity, pending_prefill_s=pending_s)  # fmt: skip


def request(num_tokens: int | None, matches: dict[str, PrefixMatch] | None = None,
            keys: list[int] | None = None) -> RoutingRequest:  # fmt: skip
    if keys is None and num_tokens:
        keys = list(range(1, num_tokens // BLOCK + 1))
    return RoutingRequest(model="m", api_path="/v1/completions", body={}, headers={}, request_id="r",
                          num_prompt_tokens=num_tokens, chunk_keys=[RequestChunkKey(k) for k in keys or []],
                          prefix_matches={EngineId(e): m for e, m in (matches or {}).items()})  # fmt: skip


def gpu(chunks: int) -> PrefixMatch:
    return PrefixMatch(num_chunks=chunks, by_tier={TIER_GPU: chunks})


def prefix_scorer(**params: object) -> PrefixScorer:
    return PrefixScorer(PrefixParams(**params), ScorerContext(layout=KVLayout(BLOCK)))  # type: ignore[arg-type]


def test_scorers_are_registered_under_their_yaml_names() -> None:
    assert SCORERS["prefix"] is PrefixScorer
    assert SCORERS["capacity"] is CapacityScorer
    assert SCORERS["kv_aware"] is KVAwareScorer


# --- prefix --------------------------------------------------------------------------------------


def test_prefix_scores_fraction_of_prompt_cached() -> None:
    a, b, c = endpoint("a"), endpoint("b"), endpoint("c")
    # 160 tokens = 10 chunks; a holds 8 (128 tokens), b 5 (80 tokens), c nothing.
    scores = prefix_scorer(min_match_tokens=0, relative=False).score(
        request(160, {"a": gpu(8), "b": gpu(5)}), [a, b, c]
    )
    assert scores == {"a": pytest.approx(0.8), "b": pytest.approx(0.5), "c": 0.0}


def test_prefix_score_is_capped_at_one() -> None:
    # 170 tokens: 10 full chunks; holding all of them covers 160/170.
    scores = prefix_scorer(min_match_tokens=0, relative=False).score(request(170, {"a": gpu(10)}), [endpoint("a")])
    assert scores["a"] == pytest.approx(160 / 170)
    assert 0.0 <= scores["a"] <= 1.0


def test_prefix_below_min_match_tokens_scores_zero() -> None:
    a, b = endpoint("a"), endpoint("b")
    scorer = prefix_scorer(min_match_tokens=64, relative=False)
    # 3 chunks = 48 tokens < 64; 4 chunks = 64 tokens is enough.
    scores = scorer.score(request(320, {"a": gpu(3), "b": gpu(4)}), [a, b])
    assert scores["a"] == 0.0
    assert scores["b"] == pytest.approx(64 / 320)


def test_prefix_relative_discounts_what_every_candidate_holds() -> None:
    a, b, c = endpoint("a"), endpoint("b"), endpoint("c")
    matches = {"a": gpu(8), "b": gpu(5), "c": gpu(5)}
    scores = prefix_scorer(min_match_tokens=0, relative=True).score(request(160, matches), [a, b, c])
    assert scores == {"a": pytest.approx(3 * BLOCK / 160), "b": 0.0, "c": 0.0}
    # min_match_tokens applies to the part beyond the shared prefix: 48 tokens < 64.
    assert prefix_scorer(min_match_tokens=64, relative=True).score(request(160, matches), [a, b, c])["a"] == 0.0


def test_prefix_held_everywhere_gives_all_zeros() -> None:
    engines = [endpoint("a"), endpoint("b"), endpoint("c")]
    matches = {"a": gpu(10), "b": gpu(10), "c": gpu(10)}
    scores = prefix_scorer(min_match_tokens=0).score(request(160, matches), engines)
    assert scores == {"a": 0.0, "b": 0.0, "c": 0.0}
    # Without `relative` the same prefix pins every engine equally.
    absolute = prefix_scorer(min_match_tokens=0, relative=False).score(request(160, matches), engines)
    assert set(absolute.values()) == {1.0}


def test_prefix_relative_is_computed_over_the_candidates_only() -> None:
    # An engine that is not a candidate (e.g. excluded on retry) does not raise the floor.
    scores = prefix_scorer(min_match_tokens=0).score(request(160, {"a": gpu(8), "b": gpu(8)}), [endpoint("a"), endpoint("c")])
    assert scores == {"a": pytest.approx(0.8), "c": 0.0}


def test_prefix_affinity_released_at_load_imbalance() -> None:
    matches = {"a": gpu(8)}
    scorer = prefix_scorer(min_match_tokens=0, max_load_imbalance=4)
    near = scorer.score(request(160, matches), [endpoint("a", in_flight=3), endpoint("b")])
    assert near["a"] == pytest.approx(0.8)
    over = scorer.score(request(160, matches), [endpoint("a", in_flight=4), endpoint("b")])
    assert over["a"] == 0.0
    # Imbalance is relative to the least loaded candidate, not to zero.
    busy_everywhere = scorer.score(request(160, matches), [endpoint("a", in_flight=7), endpoint("b", in_flight=4)])
    assert busy_everywhere["a"] == pytest.approx(0.8)


def test_prefix_tier_weights() -> None:
    a, b, c = endpoint("a"), endpoint("b"), endpoint("c")
    matches = {
        "a": PrefixMatch(10, {TIER_GPU: 10}),
        "b": PrefixMatch(10, {TIER_CPU: 10}),
        "c": PrefixMatch(10, {TIER_STORAGE: 10}),
    }
    scores = prefix_scorer(min_match_tokens=0, relative=False).score(request(160, matches), [a, b, c])
    assert scores == {"a": pytest.approx(1.0), "b": pytest.approx(0.8), "c": pytest.approx(0.5)}
    custom = prefix_scorer(min_match_tokens=0, relative=False, tier_weights={TIER_GPU: 0.5, TIER_CPU: 1.0})
    scores = custom.score(request(160, matches), [a, b, c])
    assert scores == {"a": pytest.approx(0.5), "b": pytest.approx(1.0), "c": 0.0}  # unlisted tier counts 0


def test_prefix_best_tier_wins() -> None:
    # 4 chunks on GPU (4 × 1.0) vs 10 on CPU (10 × 0.8 = 8): the CPU run is worth more.
    match = PrefixMatch(10, {TIER_GPU: 4, TIER_CPU: 10})
    scores = prefix_scorer(min_match_tokens=0, relative=False).score(request(160, {"a": match}), [endpoint("a")])
    assert scores["a"] == pytest.approx(8 * BLOCK / 160)
    spec = PrefixMatch(10, {TIER_GPU: 4, TIER_SPECULATIVE: 10})
    scores = prefix_scorer(min_match_tokens=0, relative=False).score(request(160, {"a": spec}), [endpoint("a")])
    assert scores["a"] == pytest.approx(1.0)


def test_prefix_without_prompt_tokens_has_no_opinion() -> None:
    engines = [endpoint("a"), endpoint("b")]
    assert prefix_scorer().score(request(None), engines) == {"a": 0.0, "b": 0.0}
    assert prefix_scorer().score(request(160, {"a": gpu(8)}), []) == {}


# --- capacity ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def capacity_scorer(working_sets: WorkingSetTracker, **params: object) -> CapacityScorer:
    return CapacityScorer(CapacityParams(**params), ScorerContext(layout=KVLayout(BLOCK), working_sets=working_sets))  # type: ignore[arg-type]


def keys(start: int, count: int) -> list[RequestChunkKey]:
    return [RequestChunkKey(k) for k in range(start, start + count)]


def test_capacity_prefers_room() -> None:
    ws = WorkingSetTracker(clock=FakeClock())
    roomy, busy, full = endpoint("a", capacity=100), endpoint("b", capacity=100), endpoint("c", capacity=100)
    ws.touch(busy.id, keys(1000, 70))
    ws.touch(full.id, keys(2000, 95))
    req = request(160, keys=list(range(1, 11)))  # 10 new chunks
    scores = capacity_scorer(ws).score(req, [roomy, busy, full])
    assert scores["a"] == pytest.approx(1 - 0.5 * 0.1 / 0.8)  # 10 % full
    assert scores["b"] == pytest.approx(0.5)  # exactly at the 80 % target
    assert scores["c"] == 0.0  # would overflow
    assert scores["a"] > scores["b"] > scores["c"]


def test_capacity_drops_linearly_above_target() -> None:
    ws = WorkingSetTracker(clock=FakeClock())
    e = endpoint("a", capacity=100)
    ws.touch(e.id, keys(1000, 80))
    score = capacity_scorer(ws).score(request(160, keys=list(range(1, 11))), [e])["a"]  # 90 % full
    assert score == pytest.approx(0.25)


def test_capacity_unknown_scores_half() -> None:
    ws = WorkingSetTracker(clock=FakeClock())
    scores = capacity_scorer(ws).score(request(160), [endpoint("a"), endpoint("b", capacity=0)])
    assert scores == {"a": 0.5, "b": 0.5}


def test_capacity_does_not_count_keys_already_in_working_set() -> None:
    ws = WorkingSetTracker(clock=FakeClock())
    warm, cold = endpoint("a", capacity=100), endpoint("b", capacity=100)
    req = request(160, keys=list(range(1, 11)))
    ws.touch(warm.id, req.chunk_keys + keys(1000, 60))  # 70 including this prompt
    ws.touch(cold.id, keys(2000, 60))  # 60 others: 70 once this prompt is added
    scores = capacity_scorer(ws).score(req, [warm, cold])
    assert scores["a"] == pytest.approx(1 - 0.5 * 0.7 / 0.8)
    assert scores["b"] == pytest.approx(1 - 0.5 * 0.7 / 0.8)


def test_capacity_does_not_mutate_working_sets() -> None:
    ws = WorkingSetTracker(clock=FakeClock())
    e = endpoint("a", capacity=100)
    capacity_scorer(ws).score(request(160), [e])
    assert ws.size(e.id) == 0


def test_capacity_counts_expired_working_set_keys_as_new() -> None:
    # Keys routed to the engine longer ago than the window are no longer in its working set;
    # a prompt made of them needs room again, like on an engine that never saw them.
    clock = FakeClock()
    ws = WorkingSetTracker(window_s=60, clock=clock)
    stale, fresh = endpoint("a", capacity=10), endpoint("b", capacity=10)
    req = request(160, keys=list(range(1, 11)))  # 10 chunks: fills a 10-block cache
    ws.touch(stale.id, req.chunk_keys)
    clock.now = 1000.0
    scores = capacity_scorer(ws).score(req, [stale, fresh])
    assert scores["b"] == 0.0
    assert scores["a"] == scores["b"]


# --- kv_aware ------------------------------------------------------------------------------------


def kv_scorer(cost_model: CostModel | None = None) -> KVAwareScorer:
    return KVAwareScorer(ScorerParams(), ScorerContext(layout=KVLayout(BLOCK), cost_model=cost_model or CostModel()))


def test_kv_aware_prefers_engine_holding_prefix() -> None:
    holder, other = endpoint("a"), endpoint("b")
    req = request(4096, {"a": gpu(250)})  # 4000 of 4096 tokens cached on a
    scores = kv_scorer().score(req, [holder, other])
    assert scores["a"] == 1.0
    assert 0.0 < scores["b"] < 0.5  # a full 4k prefill is far slower than 96 tokens


def test_kv_aware_queue_on_holder_flips_choice() -> None:
    holder, other = endpoint("a", pending_s=10.0), endpoint("b")
    req = request(4096, {"a": gpu(250)})
    scores = kv_scorer().score(req, [holder, other])
    assert scores["b"] == 1.0
    assert scores["a"] < scores["b"]


def test_kv_aware_estimates_are_ttft() -> None:
    model = CostModel()
    holder, other = endpoint("a", pending_s=0.5, in_flight=2), endpoint("b")
    req = request(4096, {"a": gpu(250)})
    estimates = kv_scorer(model).estimates(req, [holder, other])
    assert estimates["a"].own_hit_s == pytest.approx(model.ttft_s(4000, 96, 0.5, 2))
    assert estimates["a"].recompute_s == pytest.approx(model.ttft_s(0, 4096, 0.5, 2))
    assert estimates["a"].transfer is None and estimates["a"].store_load is None
    assert estimates["a"].chosen == "own_hit" and estimates["a"].best_s == estimates["a"].own_hit_s
    assert estimates["b"].own_hit_s is None and estimates["b"].chosen == "recompute"
    assert estimates["b"].best_s == estimates["b"].recompute_s == pytest.approx(model.ttft_s(0, 4096, 0.0, 0))


def test_kv_aware_never_counts_the_last_prompt_token_as_cached() -> None:
    model = CostModel()
    # The whole prompt is in cache; vLLM still computes its last token, so its hit stops at
    # the last whole block before it: 48 cached, 16 computed (as it reports cached_tokens).
    req = request(64, {"a": gpu(4)})
    estimates = kv_scorer(model).estimates(req, [endpoint("a")])
    assert estimates["a"].own_hit_s == pytest.approx(model.ttft_s(48, 16, 0.0, 0))


def test_kv_aware_scores_are_relative_to_fastest() -> None:
    scores = kv_scorer().score(request(1024), [endpoint("a"), endpoint("b", in_flight=3)])
    assert scores["a"] == 1.0
    assert 0.0 < scores["b"] < 1.0
    assert kv_scorer().score(request(1024), []) == {}


# --- kv_aware with a shared KV store -------------------------------------------------------------


def stored(chunks: int, own: int = 0) -> PrefixMatch:
    """An engine attached to a store holding `chunks` of the prefix, `own` of them on its GPU."""
    by_tier = {TIER_STORAGE: chunks, **({TIER_GPU: own} if own else {})}
    return PrefixMatch(num_chunks=max(chunks, own), by_tier=by_tier)


@pytest.mark.parametrize("num_tokens", [2048, 8192])
def test_a_store_load_is_priced_between_a_local_hit_and_recomputing(num_tokens: int) -> None:
    model = CostModel()
    cached = num_tokens - BLOCK
    req = request(num_tokens, {"local": gpu(cached // BLOCK), "store": stored(cached // BLOCK)})
    estimates = kv_scorer(model).estimates(req, [endpoint("local"), endpoint("store")])
    local, store = estimates["local"], estimates["store"]
    assert local.chosen == "own_hit" and local.store_load is None
    assert store.chosen == "store_load" and store.own_hit_s is None
    assert store.store_load is not None and store.store_load.loaded_tokens == cached
    assert local.best_s < store.best_s < store.recompute_s
    # With the priors: a load adds a few ms per 2k tokens (measured ~5-10 ms), far below a prefill.
    assert 0.005 < store.best_s - local.best_s < 0.06


def test_a_store_load_counts_only_what_the_engine_does_not_hold_itself() -> None:
    model = CostModel()
    req = request(4096, {"a": stored(200, own=100)})
    estimate = kv_scorer(model).estimates(req, [endpoint("a")])["a"]
    assert estimate.store_load is not None and estimate.store_load.loaded_tokens == 100 * BLOCK
    assert estimate.own_hit_s == pytest.approx(model.ttft_s(1600, 4096 - 1600, 0.0, 0))
    # Its store reaches further than its own cache: vLLM loads it, whatever the own hit costs.
    assert estimate.chosen == "store_load"
    # A store run inside its own cache is nothing to load.
    assert kv_scorer(model).estimates(request(4096, {"a": stored(50, own=100)}), [endpoint("a")])["a"].chosen == "own_hit"


def test_kv_aware_prefers_the_store_over_recomputing_and_a_local_hit_over_the_store() -> None:
    req = request(4096, {"store": stored(250)})
    scores = kv_scorer().score(req, [endpoint("store"), endpoint("cold")])
    assert scores["store"] == 1.0 and scores["cold"] < 0.5
    req = request(4096, {"store": stored(250), "local": gpu(250)})
    scores = kv_scorer().score(req, [endpoint("store"), endpoint("local")])
    assert scores["local"] == 1.0 and scores["store"] < 1.0
    assert req.ttft_estimates[EngineId("store")].chosen == "store_load"


def test_the_estimate_lists_all_four_options() -> None:
    estimate = kv_scorer().estimates(request(4096, {"a": stored(200, own=100)}), [endpoint("a")])["a"]
    options = estimate.options_s()
    assert list(options) == ["own_hit", "store_load", "peer_pull", "recompute"]
    assert options["peer_pull"] is None  # no transfers without a registry and kv_transfer
    assert options["own_hit"] is not None and options["store_load"] is not None
    assert options["recompute"] == estimate.recompute_s
