"""Planning a join's warm-up and a drain's hand-off, and running a plan (a fake transfer)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from engine_adapter.transfer.nixl import EngineAddress, KVTransferError, NixlPullTransfer, TransferTimings
from gateway.config import ElasticConfig
from gateway.elastic.hot_prefixes import HotPrefix, HotPrefixes
from gateway.elastic.warmup import Plan, Pull, Warmer, plan_drain, plan_join
from gateway.endpoints.registry import Endpoint
from gateway.metrics import GatewayMetrics
from gateway.types import TIER_GPU, TIER_SPECULATIVE, TIER_STORAGE, EngineId, PrefixMatch, RequestChunkKey

BLOCK = 4
MIN_TOKENS = 4


def engine(name: str, load: int = 0) -> Endpoint:
    e = Endpoint(EngineId(name), f"http://{name}", kv_transfer=True, configured_models=frozenset({"m"}))
    e.in_flight = load
    return e


def prefixes(*chains: Sequence[int]) -> list[HotPrefix]:
    """Hottest first: the first chain is noted most."""
    hot = HotPrefixes(max_prefixes=100, max_tokens=1000, half_life_s=60)
    for uses, chain in enumerate(reversed(chains), 1):
        for _ in range(uses):
            hot.note("m", list(range(len(chain) * BLOCK)), [RequestChunkKey(k) for k in chain], BLOCK)
    return hot.hottest()


class Index:
    """Which leading chunks each engine holds, by tier."""

    def __init__(self) -> None:
        self.held: dict[tuple[EngineId, str], set[RequestChunkKey]] = {}

    def hold(self, name: str, keys: Sequence[int], tier: str = TIER_GPU) -> None:
        self.held.setdefault((EngineId(name), tier), set()).update(RequestChunkKey(k) for k in keys)

    def lookup(self, keys: Sequence[RequestChunkKey]) -> dict[EngineId, PrefixMatch]:
        found: dict[EngineId, PrefixMatch] = {}
        for (name, tier), held in self.held.items():
            run = 0
            while run < len(keys) and keys[run] in held:
                run += 1
            if run:
                match = found.setdefault(name, PrefixMatch())
                match.by_tier[tier] = run
                match.num_chunks = max(match.num_chunks, run)
        return found


def join(target: Endpoint, hot: list[HotPrefix], index: Index, fleet: list[Endpoint], **budget: Any) -> Plan:
    return plan_join(target, hot, index.lookup, lambda model: fleet, block_size=BLOCK, min_prefix_tokens=MIN_TOKENS,
                     config=ElasticConfig(**budget))  # fmt: skip


def drain(drained: Endpoint, hot: list[HotPrefix], index: Index, peers: list[Endpoint], **budget: Any) -> Plan:
    return plan_drain(drained, hot, index.lookup, lambda model: peers, block_size=BLOCK, min_prefix_tokens=MIN_TOKENS,
                      config=ElasticConfig(**budget))  # fmt: skip


def summary(plan: Plan) -> list[tuple[int, str, str, int, int]]:
    return [(p.prefix.chunk_keys[0], p.source, p.target, p.num_tokens, p.moved_tokens) for p in plan.pulls]


def test_join_pulls_each_hot_prefix_from_the_peer_holding_most_of_it() -> None:
    a, b, new = engine("a"), engine("b"), engine("new")
    index = Index()
    index.hold("a", [10, 11])
    index.hold("b", [10, 11, 12])
    index.hold("a", [20, 21])
    plan = join(new, prefixes([10, 11, 12], [20, 21]), index, [a, b, new])
    assert summary(plan) == [(10, "b", "new", 12, 12), (20, "a", "new", 8, 8)]


def test_join_skips_what_the_target_has_or_loads_from_its_store_and_what_nobody_holds() -> None:
    a, new = engine("a"), engine("new")
    index = Index()
    index.hold("a", [10, 11])
    index.hold("new", [10, 11])  # held already
    index.hold("a", [20, 21])
    index.hold("new", [20, 21], TIER_STORAGE)  # its store has it
    # 30: nobody holds it (the engine that had it left)
    plan = join(new, prefixes([10, 11], [20, 21], [30, 31]), index, [a, new])
    assert plan.pulls == [] and (plan.num_held, plan.num_in_store, plan.num_unheld) == (1, 1, 1)


def test_join_moves_only_what_the_target_lacks_and_what_an_earlier_pull_gives_it() -> None:
    a, new = engine("a"), engine("new")
    index = Index()
    index.hold("a", [10, 11, 12, 13])
    index.hold("new", [10])
    # The hotter prompt extends the other: pulling it gives the other too.
    plan = join(new, prefixes([10, 11, 12, 13], [10, 11]), index, [a, new])
    assert summary(plan) == [(10, "a", "new", 16, 12)] and plan.num_held == 1


def test_join_stays_within_the_budget_and_above_the_minimum() -> None:
    a, new = engine("a"), engine("new")
    index = Index()
    for first in (10, 20, 30):
        index.hold("a", [first, first + 1])
    hot = prefixes([10, 11], [20, 21], [30, 31])
    assert len(join(new, hot, index, [a, new], max_prefixes=2).pulls) == 2
    plan = join(new, hot, index, [a, new], max_tokens=17)
    assert len(plan.pulls) == 2 and plan.num_over_budget == 1
    index.hold("new", [10])
    assert [p.prefix.chunk_keys[0] for p in join(new, hot, index, [a, new], max_prefixes=0).pulls] == []
    below = plan_join(new, hot, index.lookup, lambda m: [a, new], block_size=BLOCK, min_prefix_tokens=5,
                      config=ElasticConfig())  # fmt: skip
    assert [p.prefix.chunk_keys[0] for p in below.pulls] == [20, 30]  # 10 would move 4 tokens
    # Too small to be worth a pull, not unheld: `a` holds all of it.
    assert (below.num_too_small, below.num_unheld, below.num_over_budget) == (1, 0, 0)


def test_drain_counts_a_pull_under_the_minimum_as_too_small() -> None:
    gone, peer = engine("gone"), engine("peer")
    index = Index()
    index.hold("gone", [10, 11, 12])
    index.hold("peer", [10, 11])  # only the last chunk (4 tokens) would move
    plan = plan_drain(gone, prefixes([10, 11, 12]), index.lookup, lambda m: [peer], block_size=BLOCK,
                      min_prefix_tokens=5, config=ElasticConfig())  # fmt: skip
    assert plan.pulls == [] and (plan.num_too_small, plan.num_unheld, plan.num_held) == (1, 0, 0)


def test_join_warms_only_models_the_target_serves() -> None:
    a, new = engine("a"), engine("new")
    new.configured_models = frozenset({"other"})
    index = Index()
    index.hold("a", [10, 11])
    assert join(new, prefixes([10, 11]), index, [a, new]).pulls == []


def test_drain_hands_what_only_it_holds_to_the_least_loaded_peer() -> None:
    gone, busy, idle = engine("gone"), engine("busy", load=5), engine("idle")
    index = Index()
    index.hold("gone", [10, 11])
    index.hold("gone", [20, 21])
    index.hold("busy", [20, 21])  # held elsewhere already
    index.hold("gone", [30, 31, 32])
    index.hold("busy", [30])  # partly held: there, the fewest tokens move
    plan = drain(gone, prefixes([10, 11], [20, 21], [30, 31, 32], [40, 41]), index, [busy, idle])
    assert summary(plan) == [(10, "gone", "idle", 8, 8), (30, "gone", "busy", 12, 8)]
    assert plan.num_held == 1


def test_drain_spreads_prompts_over_equal_peers_and_counts_a_store_as_held() -> None:
    gone, p, q = engine("gone"), engine("p"), engine("q")
    index = Index()
    index.hold("gone", [10, 11])
    index.hold("gone", [20, 21])
    index.hold("gone", [30, 31])
    index.hold("q", [30, 31], TIER_STORAGE)
    plan = drain(gone, prefixes([10, 11], [20, 21], [30, 31]), index, [p, q])
    assert sorted(pull.target for pull in plan.pulls) == ["p", "q"] and plan.num_held == 1
    assert drain(gone, prefixes([10, 11]), index, []).num_unheld == 1


class FakeTransfer:
    def __init__(self, fail_on: set[str] = frozenset(), delay_s: float = 0.0) -> None:  # type: ignore[assignment]
        self.calls: list[tuple[str, str, int]] = []
        self._fail_on = fail_on
        self._delay_s = delay_s

    async def transfer(self, holder: EngineAddress, target: EngineAddress, model: str, prefix_token_ids: Sequence[int],
                       *, timeout_s: float, request_id: str) -> TransferTimings:  # fmt: skip
        self.calls.append((holder.url, target.url, len(prefix_token_ids)))
        await asyncio.sleep(self._delay_s)
        if holder.url in self._fail_on:
            raise KVTransferError("prepare", "holder gone")
        return TransferTimings(0.01, 0.01)


def run(plan: Plan, fake: FakeTransfer, fleet: list[Endpoint], max_s: float = 10) -> tuple[Any, list[Pull], GatewayMetrics]:
    metrics = GatewayMetrics()
    by_id = {e.id: e for e in fleet}
    done: list[Pull] = []
    outcome = asyncio.run(Warmer(cast(NixlPullTransfer, fake), metrics).run(
        "join", plan, by_id.get, done.append, max_s=max_s))  # fmt: skip
    return outcome, done, metrics


def test_the_warmer_runs_the_pulls_and_counts_what_failed() -> None:
    a, b, new = engine("a"), engine("b"), engine("new")
    index = Index()
    index.hold("a", [10, 11])
    index.hold("b", [20, 21, 22])
    plan = join(new, prefixes([10, 11], [20, 21, 22]), index, [a, b, new])
    fake = FakeTransfer(fail_on={"http://b"})
    outcome, done, metrics = run(plan, fake, [a, b, new])
    assert fake.calls == [("http://a", "http://new", 8), ("http://b", "http://new", 12)]
    assert (outcome.num_pulled, outcome.num_failed, outcome.moved_tokens) == (1, 1, 8)
    assert [p.source for p in done] == ["a"]
    assert metrics.elastic_prefixes.labels("join", "pulled")._value.get() == 1
    assert metrics.elastic_prefixes.labels("join", "failed")._value.get() == 1


def test_the_warmer_reports_the_plans_too_small_and_unheld_apart() -> None:
    a, new = engine("a"), engine("new")
    plan = Plan(num_unheld=2, num_too_small=3)
    outcome, _, metrics = run(plan, FakeTransfer(), [a, new])
    assert (outcome.num_unheld, outcome.num_too_small) == (2, 3)
    assert metrics.elastic_prefixes.labels("join", "unheld")._value.get() == 2
    assert metrics.elastic_prefixes.labels("join", "too_small")._value.get() == 3


def test_the_warmer_stops_at_its_time_budget() -> None:
    a, new = engine("a"), engine("new")
    index = Index()
    index.hold("a", [10, 11])
    index.hold("a", [20, 21])
    plan = join(new, prefixes([10, 11], [20, 21]), index, [a, new])
    outcome, done, _ = run(plan, FakeTransfer(delay_s=0.05), [a, new], max_s=0.01)
    assert (outcome.num_pulled, outcome.num_over_budget) == (1, 1)


def test_a_pull_stands_in_the_index_as_speculative_until_the_engine_confirms() -> None:
    from gateway.elastic.warmup import speculative_entry

    a, new = engine("a"), engine("new")
    index = Index()
    index.hold("a", [10, 11])
    [pull] = join(new, prefixes([10, 11, 12]), index, [a, new]).pulls
    assert speculative_entry(pull, BLOCK) == ("new", (10, 11), TIER_SPECULATIVE)
