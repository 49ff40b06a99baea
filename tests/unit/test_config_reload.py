"""Configuration reload (gateway.reload, gateway.runtime) against fake engines: what a new file
changes, what it must not, and a file that cannot run being refused with the old one staying."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from engine_adapter.events.model import ChunkStored, EventBatch
from gateway.app import build_app
from gateway.config import ConfigError, parse_config
from gateway.config_diff import diff_configs
from gateway.config_file import ConfigFile
from gateway.endpoints.shared import SharedFleetState
from gateway.kvindex.base import TIER_GPU, TIER_SPECULATIVE
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.removal import drop_engine
from gateway.runtime import GatewayRuntime
from gateway.types import EngineId, RequestChunkKey
from tests.unit.fake_engines import Engines

ADMIN = "a-real-admin-token"


class Fleet:
    """Engines at http://<name>, answered by `Engines`; records who was asked what, and can
    hold an engine's inference answers until released (an in-flight request)."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.asked: list[tuple[str, str]] = []
        self.held: dict[str, asyncio.Event] = {}
        self.down: set[str] = set()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.asked.append((request.url.host, request.url.path))
        if request.url.host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        gate = self.held.get(request.url.host)
        if gate is not None and request.url.path == "/v1/completions":
            await gate.wait()
        return self.engines.handler(request)

    def times_asked(self, host: str, path: str) -> int:
        return self.asked.count((host, path))


@pytest.fixture()
def fleet(engines: Engines) -> Fleet:
    return Fleet(engines)


def engine(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "url": f"http://{name}", **settings}


def write(path: Path, engines: list[dict[str, Any]], **sections: Any) -> None:
    # Health rounds only when a test asks for one; the file polled often, so tests wait little.
    sections = {"health": {"interval_s": 600}, **sections}
    sections["server"] = {"config_poll_interval_s": 0.05, "admin_token": ADMIN, **sections.get("server", {})}
    path.write_text(yaml.safe_dump({"engines": engines, **sections}))


@contextmanager
def gateway(fleet: Fleet, path: Path, shared: SharedFleetState | None = None) -> Iterator[TestClient]:
    file = ConfigFile(path=str(path))
    config, digest = file.read()
    app = build_app(config, transport=httpx.MockTransport(fleet.handler), shared=shared, config_file=file,
                    config_digest=digest)  # fmt: skip
    with TestClient(app) as client:
        yield client


@contextmanager
def releasing(client: TestClient, gate: asyncio.Event) -> Iterator[None]:
    """Held requests are let go whatever happens (the app waits for them to stop)."""
    try:
        yield
    finally:
        client.portal.call(gate.set)


def runtime(client: TestClient) -> GatewayRuntime:
    found: GatewayRuntime = client.app.state.runtime  # type: ignore[attr-defined]
    return found


def reloads(client: TestClient, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'gateway_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def reload_now(client: TestClient) -> str | None:
    """What SIGHUP does, awaited: read the file now, changed or not."""
    reloader = client.app.state.reloader  # type: ignore[attr-defined]
    outcome: str | None = client.portal.call(functools.partial(reloader.reload, "test", force=True))
    return outcome


def complete(client: TestClient, model: str = "m") -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 1})


def served_by(client: TestClient, requests: int) -> set[str]:
    return {complete(client).headers["x-gateway-engine"] for _ in range(requests)}


# -- what a reload changes -------------------------------------------------------------------


def test_an_engine_added_to_the_file_is_checked_then_takes_requests(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")], routing={"policy": "round_robin"})
    with gateway(fleet, path) as client:
        assert served_by(client, 4) == {"a"}
        write(path, [engine("a"), engine("b")], routing={"policy": "round_robin"})
        wait_until(lambda: reloads(client, "applied") == 1, "the file change to be applied")
        # Checked before it took traffic: its health and models were asked once already.
        assert fleet.times_asked("b", "/health") == 1 and fleet.times_asked("b", "/v1/models") == 1
        assert served_by(client, 4) == {"a", "b"}
        assert client.get("/health").json()["engines_total"] == 2
        assert 'gateway_engine_healthy{engine="b"} 1.0' in client.get("/metrics").text


def test_an_added_engine_that_fails_its_first_check_takes_no_request(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")], routing={"policy": "round_robin"})
    fleet.down.add("b")
    with gateway(fleet, path) as client:
        write(path, [engine("a"), engine("b")], routing={"policy": "round_robin"})
        assert reload_now(client) == "applied"
        assert served_by(client, 4) == {"a"}  # unchecked, it would have been in rotation
        assert client.get("/health").json()["engines_available"] == 1
        assert 'gateway_engine_healthy{engine="b"} 0.0' in client.get("/metrics").text


def test_a_removed_engine_stops_being_checked_followed_and_indexed(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    engines = [engine("a"), engine("b", kv_events_endpoint="tcp://127.0.0.1:9")]
    write(path, engines)
    with gateway(fleet, path) as client:
        gateway_runtime = runtime(client)
        assert set(gateway_runtime.feeds.subscribers) == {"b"}
        subscriber = gateway_runtime.feeds.subscribers["b"]
        tokens = tuple(range(100, 100 + 3 * 32))
        stored = EventBatch(seq=0, ts=0.0, events=(ChunkStored((1, 2, 3), None, tokens, 32, TIER_GPU),))
        client.portal.call(gateway_runtime.ingestor.apply, "b", stored)
        client.portal.call(gateway_runtime.ingestor.apply, "a", stored)
        assert gateway_runtime.index.num_chunks(EngineId("b")) == 3
        asked_before = fleet.times_asked("b", "/health")

        write(path, [engine("a")])
        assert reload_now(client) == "applied"

        assert gateway_runtime.index.num_chunks(EngineId("b")) == 0
        assert gateway_runtime.ingestor.known_blocks(EngineId("b")) == 0
        assert gateway_runtime.index.num_chunks(EngineId("a")) == 3  # the engine that stays keeps its entries
        assert "b" not in gateway_runtime.feeds.subscribers and subscriber._task is None  # noqa: SLF001
        client.portal.call(gateway_runtime.checker.check_all)
        assert fleet.times_asked("b", "/health") == asked_before
        assert served_by(client, 3) == {"a"}
        assert 'engine="b"' not in "".join(
            line for line in client.get("/metrics").text.splitlines() if line.startswith("gateway_engine_healthy")
        )


def test_a_request_in_flight_to_a_removed_engine_finishes_normally(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    # Model "only-b" is served by b alone, so the held request goes there.
    write(path, [engine("a"), engine("b", models=["only-b"])], routing={"policy": "round_robin"})
    fleet.held["b"] = asyncio.Event()
    with gateway(fleet, path) as client, releasing(client, fleet.held["b"]):
        answers: list[httpx.Response] = []
        in_flight = threading.Thread(target=lambda: answers.append(complete(client, "only-b")))
        in_flight.start()
        wait_until(lambda: fleet.times_asked("b", "/v1/completions") == 1, "the request to reach engine b")
        removed = runtime(client).registry.get("b")
        assert removed is not None and removed.in_flight == 1

        write(path, [engine("a")], routing={"policy": "round_robin"})
        assert reload_now(client) == "applied"
        assert complete(client, "only-b").status_code == 404  # the new configuration has no such model
        assert complete(client).headers["x-gateway-engine"] == "a"

        client.portal.call(fleet.held["b"].set)
        in_flight.join(timeout=10)
        assert [(r.status_code, r.headers["x-gateway-engine"]) for r in answers] == [(200, "b")]
        assert removed.in_flight == 0


def test_with_workers_a_removed_engine_no_longer_counts_in_the_shared_load(fleet: Fleet, tmp_path: Path) -> None:
    """Its column may go to an engine of the same name later: this worker's requests still
    under way on the removed one must not count there."""
    path_state = SharedFleetState.create(tmp_path / "fleet.state", rows=2, slots=4)
    mine, other_worker = SharedFleetState.attach(path_state), SharedFleetState.attach(path_state)
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b", models=["only-b"])], routing={"policy": "round_robin"})
    fleet.held["b"] = asyncio.Event()
    try:
        with gateway(fleet, path, shared=mine) as client, releasing(client, fleet.held["b"]):
            column = other_worker.slot("b")
            in_flight = threading.Thread(target=lambda: complete(client, "only-b"))
            in_flight.start()
            wait_until(lambda: other_worker.others_in_flight(column) == 1, "the other worker to see the request")
            write(path, [engine("a")], routing={"policy": "round_robin"})
            assert reload_now(client) == "applied"
            assert other_worker.others_in_flight(column) == 0
            client.portal.call(fleet.held["b"].set)
            in_flight.join(timeout=10)
            assert other_worker.others_in_flight(column) == 0
    finally:
        mine.close()
        other_worker.close()


def test_policy_and_weights_change_live(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b")], routing={"policy": "round_robin"})
    with gateway(fleet, path) as client:
        complete(client)
        write(path, [engine("a"), engine("b")],
              routing={"scorers": [{"name": "least_loaded", "weight": 0.5}, {"name": "round_robin", "weight": 2}]})  # fmt: skip
        assert reload_now(client) == "applied"
        complete(client)
        decisions = [line for line in client.get("/metrics").text.splitlines()
                     if line.startswith("gateway_routing_decisions_total")]  # fmt: skip
        assert {line.split('policy="')[1].split('"')[0] for line in decisions} == {"round_robin", "least_loaded+round_robin"}
        weights = [(w.scorer.name, w.weight) for w in runtime(client).generation.router.scorers]
        assert weights == [("least_loaded", 0.5), ("round_robin", 2.0)]


def test_a_policy_that_reads_prompts_starts_tokenizing_when_it_arrives(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b")], routing={"policy": "round_robin"})
    with gateway(fleet, path) as client:
        assert runtime(client).tokenizers is None
        assert "x-gateway-prompt-tokens" not in complete(client).headers
        write(path, [engine("a"), engine("b")], routing={"policy": "prefix"})
        assert reload_now(client) == "applied"
        tokenizers = runtime(client).tokenizers
        assert tokenizers is not None and tokenizers.status["m"].source.startswith("local ")  # checked already
        expected = fleet.engines.tokenizer.token_ids_sync("/v1/completions", {"prompt": "hello there"})
        assert expected and complete(client).headers["x-gateway-prompt-tokens"] == str(len(expected))
        assert client.get("/health").json()["status"] == "ok"


def test_an_engine_whose_settings_change_keeps_its_state(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b")])
    with gateway(fleet, path) as client:
        before = runtime(client).registry.get("b")
        assert before is not None
        before.set_draining(True)
        write(path, [engine("a"), engine("b", models=["extra"], api_key="engine-key", kv_capacity_blocks=99,
                                          kv_transfer=True, role="decode")])  # fmt: skip
        assert reload_now(client) == "applied"
        after = runtime(client).registry.get("b")
        assert after is before and after.is_draining  # the same engine: its state stays
        assert after.kv_capacity_blocks == 99 and after.api_key == "engine-key" and "extra" in after.models
        assert after.kv_transfer and after.role == "decode"


def test_new_kv_event_endpoints_are_followed_and_the_cache_known_stays(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b", kv_events_endpoint="tcp://127.0.0.1:9")])
    with gateway(fleet, path) as client:
        gateway_runtime = runtime(client)
        keys = [RequestChunkKey(k) for k in (21, 22)]
        client.portal.call(lambda: gateway_runtime.index.add(EngineId("b"), keys, TIER_GPU))
        before = gateway_runtime.feeds.subscribers["b"]
        write(path, [engine("a"), engine("b", kv_events_endpoint="tcp://127.0.0.1:10")])
        assert reload_now(client) == "applied"
        after = gateway_runtime.feeds.subscribers["b"]
        assert after is not before and after.source.endpoint == "tcp://127.0.0.1:10"
        assert gateway_runtime.index.num_chunks(EngineId("b")) == 2  # the same engine, the same cache


def test_a_models_tokenizer_setting_changes_live(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")])
    with gateway(fleet, path) as client:
        tokenizers = runtime(client).tokenizers
        assert tokenizers is not None and tokenizers.status["m"].source.startswith("local ")
        write(path, [engine("a")], models=[{"name": "m", "tokenizer": "engine"}])
        assert reload_now(client) == "applied"
        wait_until(lambda: tokenizers.status["m"].source == "engine", "the model to be checked with its new setting")
        tokenized_before = fleet.times_asked("a", "/tokenize")
        assert complete(client).status_code == 200
        assert fleet.times_asked("a", "/tokenize") == tokenized_before + 1  # the engine tokenizes now


def test_an_engine_with_another_url_is_another_engine(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b")])
    with gateway(fleet, path) as client:
        gateway_runtime = runtime(client)
        before = gateway_runtime.registry.get("b")
        keys = [RequestChunkKey(k) for k in (11, 12)]
        client.portal.call(lambda: gateway_runtime.working_sets.touch(EngineId("b"), keys))
        client.portal.call(lambda: gateway_runtime.index.add(EngineId("b"), keys, TIER_SPECULATIVE, ttl_s=600))
        write(path, [engine("a"), {"name": "b", "url": "http://c"}])
        assert reload_now(client) == "applied"
        after = gateway_runtime.registry.get("b")
        assert after is not before and after is not None and after.url == "http://c"
        assert fleet.times_asked("c", "/health") == 1  # checked before it took traffic
        assert gateway_runtime.index.num_chunks(EngineId("b"), TIER_SPECULATIVE) == 0  # not its cache


def test_restart_only_fields_keep_their_running_values_and_are_named(
    fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")])
    with gateway(fleet, path) as client:
        write(path, [engine("a")], server={"port": 9999, "workers": 3}, kv_index={"capacity_chunks": 5000},
              proxy={"max_retries": 0})  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="gateway.runtime"):
            assert reload_now(client) == "applied"  # proxy changed
        config = runtime(client).generation.config
        assert (config.server.port, config.server.workers, config.kv_index.capacity_chunks) == (8000, 1, 2_000_000)
        assert config.proxy.max_retries == 0
        warned = [r.getMessage() for r in caplog.records if "needs a restart" in r.getMessage()]
        assert len(warned) == 3
        assert any("server.port (8000 -> 9999)" in w for w in warned)
        assert any("server.workers (1 -> 3)" in w for w in warned)
        assert any("kv_index.capacity_chunks (2000000 -> 5000)" in w for w in warned)


def test_a_reload_of_the_same_content_changes_nothing(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")])
    with gateway(fleet, path) as client:
        generation = runtime(client).generation
        assert reload_now(client) == "unchanged"
        assert runtime(client).generation is generation
        assert reloads(client, "unchanged") == 1 and reloads(client, "applied") == 0


def test_with_polling_off_sighup_still_reloads(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")], server={"config_poll_interval_s": 0})
    with gateway(fleet, path) as client:
        write(path, [engine("a"), engine("b")], server={"config_poll_interval_s": 0})
        client.app.state.reloader.request_reload()  # type: ignore[attr-defined]  # what SIGHUP calls
        wait_until(lambda: reloads(client, "applied") == 1, "the reload SIGHUP asks for")
        assert client.get("/health").json()["engines_total"] == 2


def test_secrets_from_the_environment_apply_after_a_reload(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "token-from-env")
    monkeypatch.setenv("GATEWAY_API_KEYS", "key-from-env")
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")])
    with gateway(fleet, path) as client:
        write(path, [engine("a"), engine("b")], server={"admin_token": "another-file-token", "api_keys": ["file-key"]})
        assert reload_now(client) == "applied"
        admin = client.get("/admin/engines", headers={"authorization": "Bearer token-from-env"})
        assert admin.status_code == 200 and len(admin.json()["engines"]) == 2
        assert client.get("/admin/engines", headers={"authorization": "Bearer another-file-token"}).status_code == 401
        body = {"model": "m", "prompt": "hi", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 401
        for key in ("key-from-env", "file-key"):
            assert client.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}).status_code == 200


# -- a file that cannot run is refused -------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("engines: [name: a\n", "invalid YAML"),
        (yaml.safe_dump({"engines": [{"name": "a", "url": "nowhere"}]}), "engines.0.url"),
        (yaml.safe_dump({"engines": [engine("a")], "routing": {"policy": "fastest"}}), "routing.policy"),
        (yaml.safe_dump({"engines": [engine("a")], "routing": {"scorers": [{"name": "magic"}]}}),
         "routing.scorers.0.name"),
        (yaml.safe_dump({"engines": [engine("a")], "proxy": {"max_retries": -1}}), "proxy.max_retries"),
        (yaml.safe_dump({"engines": [engine("a"), engine("a")]}), "engine names must be unique"),
    ],
)  # fmt: skip
def test_a_file_that_cannot_run_is_refused_in_one_line_and_the_old_one_stays(
    fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, named: str
) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b")], routing={"policy": "round_robin"})
    with gateway(fleet, path) as client:
        generation = runtime(client).generation
        with caplog.at_level(logging.INFO, logger="gateway.reload"):
            path.write_text(content)
            wait_until(lambda: reloads(client, "refused") == 1, "the file to be refused")
        refusals = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(refusals) == 1 and named in refusals[0].getMessage() and "\n" not in refusals[0].getMessage()
        assert runtime(client).generation is generation
        assert served_by(client, 4) == {"a", "b"}
        assert reloads(client, "applied") == 0
        # Polling does not refuse the same file again; a fixed file is applied.
        write(path, [engine("a")], routing={"policy": "round_robin"})
        wait_until(lambda: reloads(client, "applied") == 1, "the fixed file to be applied")
        assert reloads(client, "refused") == 1
        assert served_by(client, 2) == {"a"}


def test_an_unreadable_file_is_refused_and_the_old_one_stays(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")])
    with gateway(fleet, path) as client:
        path.unlink()
        wait_until(lambda: reloads(client, "refused") == 1, "the missing file to be refused")
        assert complete(client).status_code == 200


def test_no_room_for_another_engine_name_in_the_shared_state_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    state = SharedFleetState.attach(SharedFleetState.create(tmp_path / "fleet.state", rows=2, slots=2))
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a"), engine("b")])
    try:
        with gateway(fleet, path, shared=state) as client:
            write(path, [engine("a"), engine("c")])
            assert reload_now(client) == "refused"
            assert [e.id for e in runtime(client).registry.endpoints] == ["a", "b"]
    finally:
        state.close()


# -- pieces ----------------------------------------------------------------------------------


def test_the_diff_sorts_engines_by_what_changed() -> None:
    running = parse_config({"engines": [engine("a"), engine("b"), engine("c"), engine("d")]})
    new = parse_config({"engines": [engine("a"), engine("b", api_key="k"), {"name": "c", "url": "http://other"},
                                    engine("e")]})  # fmt: skip
    change = diff_configs(running, new)
    assert [e.name for e in change.engines.added] == ["e"]
    assert [e.name for e in change.engines.removed] == ["d"]
    assert [(old.name, new.api_key) for old, new in change.engines.updated] == [("b", "k")]
    assert [(old.url, new.url) for old, new in change.engines.replaced] == [("http://c", "http://other")]
    assert change.sections == ("engines",) and not change.needs_restart
    assert change.engines.describe() == "+e -d ~b ±c"
    assert diff_configs(running, running).empty


def test_local_engines_and_port_from_start_up_apply_to_every_reading(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"local_engines": {"count": 1}, "engines": [engine("x")]}))
    local = parse_config({"engines": [engine("engine-0")]}).engines
    file = ConfigFile(path=str(path), port=7000).with_local_engines(local, parse_config(
        {"local_engines": {"count": 1}}).local_engines)  # type: ignore[arg-type]  # fmt: skip
    config, _ = file.read()
    assert [e.name for e in config.engines] == ["engine-0", "x"] and config.server.port == 7000
    assert [m.name for m in config.models] == ["tiny-llama"]
    assert file.resolve(config) == config  # applying it again changes nothing
    path.write_text(yaml.safe_dump({"local_engines": {"count": 1}, "engines": [{"name": "engine-0", "url": "http://y"}]}))
    with pytest.raises(ConfigError, match="engine-0 is the name of an engine local_engines started"):
        file.read()


def test_dropping_an_engine_touches_only_its_keys_and_yields_between_batches() -> None:
    index = InMemoryIndex()
    keys = [RequestChunkKey(k) for k in range(10)]
    index.add(EngineId("gone"), keys, TIER_GPU)
    index.add(EngineId("gone"), keys[:4], TIER_SPECULATIVE, ttl_s=60)
    index.add(EngineId("stays"), keys[:5], TIER_GPU)
    served: list[int] = []

    async def drop_while_serving() -> None:
        async def serve() -> None:
            for i in range(100):
                served.append(i)
                await asyncio.sleep(0)

        serving = asyncio.create_task(serve())
        await drop_engine(index, EngineId("gone"), keys, batch_keys=3)
        served.append(-1)
        serving.cancel()

    asyncio.run(drop_while_serving())
    assert index.num_chunks(EngineId("gone")) == 0 and index.num_chunks(EngineId("gone"), TIER_SPECULATIVE) == 0
    assert index.lookup(keys)[EngineId("stays")].num_chunks == 5 and EngineId("gone") not in index.lookup(keys)
    assert served.index(-1) >= 3  # the loop ran other work between the 4 batches
