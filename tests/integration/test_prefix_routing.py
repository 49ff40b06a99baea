"""Prefix-aware routing on real CPU engines: the index is fed by their KV events, predictions
are checked against what the engines report, eviction and restarts are noticed."""

from __future__ import annotations

import concurrent.futures
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Union

import httpx
import pytest

from engine_adapter.launch.launcher import EngineFleet
from gateway.kvindex.base import TIER_GPU, TIER_REPORTED, TIER_SPECULATIVE
from tests.conftest import BLOCK_SIZE, KV_BLOCKS_PER_ENGINE, MODEL_NAME
from tests.harness import GatewayProcess, GatewayServer, engine_core, gateway_config, stopped

# The in-process gateway, or `python -m gateway` with `server.workers: 2` (as users run it):
# each worker follows the engines' events, so routing must be as good with several.
Gateway = Union[GatewayServer, GatewayProcess]
TWO_WORKERS = "prefix-2-workers"
LOG_DIR = Path(__file__).resolve().parents[2] / ".cache" / "test-gateway-logs"

pytestmark = pytest.mark.integration


def text_of(seed: int, num_words: int) -> str:
    """Deterministic filler text; different seeds share no prefix."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(num_words))


def complete(gateway: Gateway, prompt: str, **extra: Any) -> httpx.Response:
    resp = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, **extra},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp


def cached(resp: httpx.Response) -> int:
    return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def gpu_chunks_held(gateway: Gateway, prompt: str | list[dict[str, str]], engine: str) -> tuple[int, int]:
    """How many leading chunks of `prompt` the gateway's index says `engine` holds on GPU
    (from the engine's events; speculative entries do not count), and the pid of the worker
    that said so. Asked through /debug/route so the index is only touched from the gateway's
    own event loop."""
    request = {"model": MODEL_NAME, "prompt": prompt} if isinstance(prompt, str) else {"model": MODEL_NAME, "messages": prompt}
    resp = httpx.post(f"{gateway.url}/debug/route", json=request, headers={"authorization": "Bearer admin"}, timeout=30)
    resp.raise_for_status()
    explained = resp.json()
    engines = explained["engines"]
    held = int(engines[engine]["matched_chunks_by_tier"].get(TIER_GPU, 0)) if engine in engines else 0
    return held, int(explained["worker_pid"])


def num_workers(gateway: Gateway) -> int:
    return int(gateway.config["server"].get("workers", 1)) if isinstance(gateway, GatewayProcess) else 1


def wait_until_held(gateway: Gateway, prompt: str | list[dict[str, str]], engine: str, condition: Callable[[int], bool], what: str,
                    timeout_s: float = 30) -> None:  # fmt: skip
    """Poll until every worker's index says of `engine`'s chunks of `prompt` what `condition`
    wants. Each worker follows the engines' events on its own: one worker's answer says nothing
    of another's, and the next request may go to either (the kernel picks who accepts)."""
    latest: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        held, pid = gpu_chunks_held(gateway, prompt, engine)
        latest[pid] = held
        if len(latest) == num_workers(gateway) and all(condition(n) for n in latest.values()):
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}: chunks held per worker {latest}"
        time.sleep(0.05)


def prefix_gateway_config(policy: str, engine_configs: list[dict[str, Any]],
                          model_configs: list[dict[str, Any]]) -> Any:  # fmt: skip
    return gateway_config(
        engine_configs,
        models=model_configs,
        routing={"policy": policy},
        kv_index={"block_size": BLOCK_SIZE},
        server={"admin_token": "admin"},
    )


def start_gateway(variant: str, engine_configs: list[dict[str, Any]],
                  model_configs: list[dict[str, Any]]) -> AbstractContextManager[Gateway]:  # fmt: skip
    if variant != TWO_WORKERS:
        return GatewayServer(prefix_gateway_config(variant, engine_configs, model_configs))
    config = prefix_gateway_config("prefix", engine_configs, model_configs).model_dump(mode="json")
    config["server"]["workers"] = 2
    return GatewayProcess(config, LOG_DIR / "prefix-2-workers.log")


@pytest.fixture(scope="module", params=["prefix", "kv_aware", TWO_WORKERS])
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def gateway(variant: str, engine_configs: list[dict[str, Any]],
            model_configs: list[dict[str, Any]]) -> Iterator[Gateway]:  # fmt: skip
    with start_gateway(variant, engine_configs, model_configs) as server:
        yield server


def test_shared_prefix_follows_the_cache_and_prediction_matches_the_engine(gateway: Gateway) -> None:
    prefix = text_of(1000 + hash(gateway.url) % 1000, 900)
    first = complete(gateway, prefix + " first question")
    engine = first.headers["x-gateway-engine"]
    assert cached(first) <= BLOCK_SIZE  # nobody held it
    # The engine's BlockStored events reach the index.
    wait_until_held(gateway, prefix, engine, lambda n: n > 0, "KV events for the prefix")
    second = complete(gateway, prefix + " second question")
    assert second.headers["x-gateway-engine"] == engine
    predicted = int(second.headers["x-gateway-predicted-cached-tokens"])
    prompt_tokens = int(second.headers["x-gateway-prompt-tokens"])
    assert prompt_tokens == second.json()["usage"]["prompt_tokens"]
    assert predicted > 0.8 * prompt_tokens
    assert abs(cached(second) - predicted) <= BLOCK_SIZE
    assert gateway.metric("gateway_cached_tokens_predictions_total", verdict="within_one_block") >= 2


def test_debug_route_explains_without_sending(gateway: Gateway) -> None:
    prefix = text_of(3000 + hash(gateway.url) % 1000, 600)
    engine = complete(gateway, prefix + " warm").headers["x-gateway-engine"]
    wait_until_held(gateway, prefix, engine, lambda n: n > 0, "KV events")
    before = gateway.metric("gateway_requests_total")
    resp = httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": prefix + " explain"},
                      headers={"authorization": "Bearer admin"}, timeout=30)  # fmt: skip
    assert resp.status_code == 200, resp.text
    explained = resp.json()
    assert explained["chosen"] == engine
    assert explained["engines"][engine]["matched_chunks_by_tier"][TIER_GPU] > 0
    assert "prefix" in explained["engines"][engine]["scores"]  # a scorer of both presets
    assert gateway.metric("gateway_requests_total") == before  # nothing was sent
    assert httpx.post(f"{gateway.url}/debug/route", json={"model": MODEL_NAME, "prompt": "x"}).status_code == 401


def test_streamed_requests_are_checked_too_and_the_client_sees_no_extra_event(gateway: Gateway) -> None:
    prefix = text_of(5000 + hash(gateway.url) % 1000, 500)
    engine = complete(gateway, prefix + " a").headers["x-gateway-engine"]
    wait_until_held(gateway, prefix, engine, lambda n: n > 0, "KV events")
    body = {"model": MODEL_NAME, "prompt": prefix + " b", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as resp:
        text = resp.read().decode()
    events = [line for line in text.split("\n\n") if line.strip()]
    assert events[-1] == "data: [DONE]"
    assert all('"choices":[]' not in e for e in events)  # the usage event the gateway asked for is gone
    assert gateway.metric("gateway_cached_tokens_predictions_total") >= 2


@pytest.mark.parametrize("policy", ["prefix", TWO_WORKERS])
def test_shared_system_prompt_spreads_across_engines(
    policy: str, engine_configs: list[dict[str, Any]], model_configs: list[dict[str, Any]], engine_fleet: EngineFleet
) -> None:
    # A gateway of its own, for the `prefix` policy (one worker and two): kv_aware weighs
    # estimated times to first token instead, by which a queue in front of a cached prefix
    # can be the faster choice, so it promises no such bound.
    with start_gateway(policy, engine_configs, model_configs) as gateway:
        check_system_prompt_spread(gateway, engine_fleet)


def check_system_prompt_spread(gateway: Gateway, engine_fleet: EngineFleet) -> None:
    """Eight clients at once share a system prompt one engine holds: that engine must not take
    them all. Affinity gives way to load: past `max_load_imbalance` (4) more requests in flight
    than the other engine, the prefix no longer counts, so of eight requests in flight together
    the other engine gets at least two.

    "In flight together" is made certain: both engines' cores are held (SIGSTOP) while the
    eight are routed, so none can end first, and resumed once the gateway has all eight in
    flight. Left to run, how requests overlap and how completions spread follow the engines'
    speeds, which a busy machine makes unequal (seen: 21 and 3 of 24 under a CPU hog)."""
    system = text_of(7000 + hash(gateway.url) % 1000, 700)

    def messages(i: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: " + text_of(i, 40)}]

    def session(i: int) -> str:
        resp = httpx.post(f"{gateway.url}/v1/chat/completions",
                          json={"model": MODEL_NAME, "messages": messages(i), "max_tokens": 16, "ignore_eos": True},
                          timeout=120)  # fmt: skip
        assert resp.status_code == 200, resp.text
        return resp.headers["x-gateway-engine"]

    holder = session(-1)
    wait_until_held(gateway, messages(0), holder, lambda n: n > 0, "KV events of the system prompt")
    cores = [engine_core(engine_fleet, name).pid for name in ("engine-0", "engine-1")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with stopped(cores):
            sessions = [pool.submit(session, i) for i in range(8)]
            deadline = time.monotonic() + 60
            while gateway.metric("gateway_engine_in_flight") < 8:
                assert time.monotonic() < deadline, "the eight requests never were in flight together"
                assert not any(s.done() for s in sessions), [s.result() for s in sessions if s.done()]
                time.sleep(0.1)
        engines = Counter(s.result() for s in sessions)
    assert len(engines) == 2 and min(engines.values()) >= 2, engines


def test_prefix_groups_beyond_one_engine_are_spread_so_each_fits(
    variant: str, engine_configs: list[dict[str, Any]], model_configs: list[dict[str, Any]]
) -> None:
    # A gateway of its own: the working sets the other tests built up must not count here.
    with start_gateway(variant, engine_configs, model_configs) as fresh:
        check_groups_spread(fresh)


def check_groups_spread(gateway: Gateway) -> None:
    # 4 groups of ~120 blocks: 480 blocks in all, more than one engine's 320, less than two.
    base = 9000 + hash(gateway.url) % 1000
    groups = [text_of(base + g, 1800) for g in range(4)]
    first_tokens = None
    placements: dict[int, set[str]] = {g: set() for g in range(4)}
    repeats = []
    for round_no in range(3):
        for g, group in enumerate(groups):
            resp = complete(gateway, group + f" round {round_no}")
            engine = resp.headers["x-gateway-engine"]
            placements[g].add(engine)
            prompt_tokens = resp.json()["usage"]["prompt_tokens"]
            first_tokens = first_tokens or prompt_tokens
            if round_no > 0:
                repeats.append(cached(resp) / prompt_tokens)
            if round_no == 0:  # the next group is placed knowing where this one went
                wait_until_held(gateway, group, engine, lambda n: n > 0, f"KV events of group {g}")
    assert first_tokens is not None and 3 * first_tokens > KV_BLOCKS_PER_ENGINE * BLOCK_SIZE
    assert all(len(p) == 1 for p in placements.values()), placements  # each group stays put
    assert sorted(Counter(next(iter(p)) for p in placements.values()).values()) == [2, 2]
    hits = sum(1 for r in repeats if r > 0.9)
    assert hits >= len(repeats) - 1, repeats


def test_eviction_and_restart_are_reflected_in_the_index(
    gateway: Gateway, engine_fleet: EngineFleet, engine_configs: list[dict[str, Any]]
) -> None:
    prompt = text_of(11000 + hash(gateway.url) % 1000, 900)
    engine = complete(gateway, prompt).headers["x-gateway-engine"]
    wait_until_held(gateway, prompt, engine, lambda n: n > 20, "KV events")
    # Fill that engine's cache directly (not through the gateway) until the prompt's blocks
    # are evicted (vLLM evicts a sequence's tail first, so fill well past capacity);
    # BlockRemoved events must retract the index's claim.
    url = next(e["url"] for e in engine_configs if e["name"] == engine)
    for i in range(7):
        httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": text_of(12000 + i, 1200),
                   "max_tokens": 1}, timeout=60).raise_for_status()  # fmt: skip
    wait_until_held(gateway, prompt, engine, lambda n: n == 0, "BlockRemoved to reach the index")
    direct = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1}, timeout=60)
    assert cached(direct) < 64  # the engine really had evicted it
    # Now it is cached again (the direct request); a restart must make the index forget it.
    wait_until_held(gateway, prompt, engine, lambda n: n > 20, "KV events after re-caching")
    engine_fleet.restart(engine)
    wait_until_held(gateway, prompt, engine, lambda n: n == 0, "the index to forget a restarted engine")


def test_a_gateway_started_after_the_engines_cached_learns_from_their_reports(
    engine_configs: list[dict[str, Any]], model_configs: list[dict[str, Any]]
) -> None:
    """vLLM announces no block it already holds: a gateway that (re)starts in front of warm
    engines learns their caches from the cached tokens they report, and routes by them."""
    prefix = text_of(15_000, 700)
    config = prefix_gateway_config("prefix", engine_configs, model_configs)
    with GatewayServer(config) as first:
        holder = complete(first, prefix + " warm it").headers["x-gateway-engine"]
    other = next(e["name"] for e in engine_configs if e["name"] != holder and e["name"].startswith("engine-"))
    admin = {"authorization": "Bearer admin"}
    # Speculative entries (written at routing time) would explain the routing below on their
    # own: here they expire at once, so only what the engine reported can.
    config.kv_index.speculative_ttl_s = 0.001
    with GatewayServer(config) as restarted:
        # Its index knows nothing of the prefix; the one request it can only send to the holder.
        assert httpx.post(f"{restarted.url}/admin/engines/{other}/drain", headers=admin).status_code == 200
        taught = complete(restarted, prefix + " first question")
        assert taught.headers["x-gateway-engine"] == holder
        assert int(taught.headers["x-gateway-predicted-cached-tokens"]) == 0 < cached(taught)
        assert httpx.post(f"{restarted.url}/admin/engines/{other}/undrain", headers=admin).status_code == 200
        explained: dict[str, Any] = {}

        def reported_held() -> bool:
            # Routed on its head, the prompt is learned whole after the answer, in a task that
            # tokenizes all of it (gateway.kvindex.service.learn_reported): not at once.
            explained.update(httpx.post(f"{restarted.url}/debug/route", json={"model": MODEL_NAME, "prompt": prefix},
                                        headers=admin, timeout=30).json())  # fmt: skip
            return bool(explained["engines"][holder]["matched_chunks_by_tier"].get(TIER_REPORTED, 0) >= 20)

        wait_until(reported_held, 30, "the reported prefix in the index")
        assert explained["engines"][holder]["matched_chunks_by_tier"].get(TIER_SPECULATIVE, 0) == 0
        for i in range(4):
            resp = complete(restarted, prefix + f" question {i}")
            predicted = int(resp.headers["x-gateway-predicted-cached-tokens"])
            assert resp.headers["x-gateway-engine"] == holder
            assert predicted > 0.8 * int(resp.headers["x-gateway-prompt-tokens"])
            assert abs(cached(resp) - predicted) <= BLOCK_SIZE
