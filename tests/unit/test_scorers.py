from __future__ import annotations

from gateway.config import RoutingConfig, ScorerConfig
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.routing.base import ScorerContext, ScorerParams
from gateway.routing.registry import build_scorers
from gateway.routing.router import Router
from gateway.routing.scorers.least_loaded import LeastLoadedParams, LeastLoadedScorer
from gateway.routing.scorers.session import SessionScorer
from gateway.types import EngineId, RoutingRequest
from engine_adapter.metrics import EngineStats


def endpoint(name: str, in_flight: int = 0, stats: EngineStats | None = None) -> Endpoint:
    return Endpoint(id=EngineId(name), url=f"http://{name}", configured_models=frozenset({"m"}), in_flight=in_flight, stats=stats)


def request(**headers: str) -> RoutingRequest:
    return RoutingRequest(model="m", api_path="/v1/completions", body={}, headers=headers, request_id="r")


def test_least_loaded_prefers_fewer_requests_and_uses_engine_view() -> None:
    scorer = LeastLoadedScorer(LeastLoadedParams(), ScorerContext())
    idle, busy = endpoint("a"), endpoint("b", in_flight=3)
    # The engine reports more work than we sent it (another gateway shares it).
    shared = endpoint("c", in_flight=0, stats=EngineStats(num_requests_running=2, num_requests_waiting=3))
    scores = scorer.score(request(), [idle, busy, shared])
    assert scores[idle.id] == 1.0
    assert scores[idle.id] > scores[busy.id] > scores[shared.id]


def test_least_loaded_counts_kv_cache_pressure() -> None:
    scorer = LeastLoadedScorer(LeastLoadedParams(kv_cache_weight=1.0), ScorerContext())
    full = endpoint("a", stats=EngineStats(kv_cache_usage=0.9))
    empty = endpoint("b", stats=EngineStats(kv_cache_usage=0.0))
    scores = scorer.score(request(), [full, empty])
    assert scores[empty.id] > scores[full.id]


def test_session_scorer_is_sticky_and_moves_few_sessions_when_an_engine_leaves() -> None:
    scorer = SessionScorer(ScorerParams(), ScorerContext(session_header="x-session-id"))
    engines = [endpoint(f"e{i}") for i in range(4)]

    def owner(session: str, pool: list[Endpoint]) -> str:
        scores = scorer.score(request(**{"x-session-id": session}), pool)
        (winner,) = [k for k, v in scores.items() if v == 1.0]
        return winner

    sessions = [f"s{i}" for i in range(400)]
    before = {s: owner(s, engines) for s in sessions}
    assert before == {s: owner(s, engines) for s in sessions}
    counts = {e.id: list(before.values()).count(e.id) for e in engines}
    assert min(counts.values()) > 60  # roughly 100 each
    after = {s: owner(s, engines[:3]) for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(before[s] == "e3" for s in moved)  # only the departed engine's sessions moved
    assert len(moved) == counts[EngineId("e3")]


def test_session_scorer_has_no_opinion_without_header() -> None:
    scorer = SessionScorer(ScorerParams(), ScorerContext())
    assert set(scorer.score(request(), [endpoint("a"), endpoint("b")]).values()) == {0.0}


def make_router(config: RoutingConfig, endpoints: list[Endpoint]) -> Router:
    return Router(EndpointRegistry(endpoints), build_scorers(config, ScorerContext()), "test")


def test_round_robin_rotates_only_when_routed() -> None:
    engines = [endpoint("a"), endpoint("b"), endpoint("c")]
    router = make_router(RoutingConfig(policy="round_robin"), engines)
    explained = [router.evaluate(request()).endpoint.id for _ in range(3)]
    assert explained == ["a", "a", "a"]
    routed = [router.route(request()).endpoint.id for _ in range(6)]
    assert routed == ["a", "b", "c", "a", "b", "c"]


def test_weights_combine_scores() -> None:
    sticky, idle = endpoint("a", in_flight=5), endpoint("b")
    session_id = next(s for s in (f"s{i}" for i in range(100)) if SessionScorer(ScorerParams(), ScorerContext()).score(
        request(**{"x-session-id": s}), [sticky, idle])[sticky.id] == 1.0)
    heavy_session = RoutingConfig(scorers=[ScorerConfig(name="session", weight=10), ScorerConfig(name="least_loaded")])
    heavy_load = RoutingConfig(scorers=[ScorerConfig(name="session", weight=0.1), ScorerConfig(name="least_loaded")])
    req = request(**{"x-session-id": session_id})
    assert make_router(heavy_session, [sticky, idle]).route(req).endpoint is sticky
    assert make_router(heavy_load, [sticky, idle]).route(req).endpoint is idle


def test_router_skips_unavailable_and_reports_scores() -> None:
    down, drained, up = endpoint("a"), endpoint("b"), endpoint("c")
    down.healthy = False
    drained.draining = True
    router = make_router(RoutingConfig(policy="least_loaded"), [down, drained, up])
    decision = router.route(request())
    assert decision.endpoint is up
    assert decision.by_scorer["least_loaded"] == {"c": 1.0}


def test_ties_are_spread() -> None:
    engines = [endpoint("a"), endpoint("b")]
    router = make_router(RoutingConfig(policy="least_loaded"), engines)
    assert {router.route(request()).endpoint.id for _ in range(4)} == {"a", "b"}
