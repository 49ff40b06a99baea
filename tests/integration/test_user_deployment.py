"""Prefix routing as users deploy it. Two CPU vLLM engines are started here by hand, not by the
project's launcher, with the arguments docker-compose.yml gives its engines (the GPU-only parts
swapped for their CPU equivalents; see `compose_engine_command`), and the gateway runs with:

  readme   the minimal YAML README.md shows, read from README.md itself;
  compose  configs/compose.yaml, its host names mapped to these engines;
  engine   the README's YAML with `tokenizer: engine`: the engines' own /tokenize, the path of a
           gateway that has no tokenizer files (stock engines refuse /render).

Nothing in these configurations names the tokenizer or the block size: the gateway must find
them, prove its token ids equal the engine's, and keep the reusable prefixes cached."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from engine_adapter.launch.launcher import NIXL_CPU_ENV, NIXL_TRANSFER_CONFIG
from gateway.config import GatewayConfig, parse_config
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH, HFPromptTokenizer
from tests.conftest import BLOCK_SIZE, MODEL_NAME, ROOT
from tests.harness import GatewayProcess, GatewayServer, free_port, stop_process_group
from tests.integration.test_prefix_routing import text_of, wait_until
from tests.integration.test_tokenization import CHATS, COMPLETIONS

pytestmark = pytest.mark.integration

# 8,192 tokens of KV cache per engine: the five groups below (about 60 blocks each once every
# turn has been seen) do not fit in one engine, and fit in two. An odd number of groups, so that
# a router blind to prefixes sends each group's turns to alternating engines.
BLOCKS_PER_ENGINE = 256
NUM_GROUPS = 5
NUM_TURNS = 4
LOG_DIR = ROOT / ".cache" / "test-engine-logs" / "user"


@dataclass
class UserEngine:
    name: str
    port: int
    events_port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def compose_engine_command(service: str, model_dir: Path, port: int, events_port: int) -> list[str]:
    """The compose service's engine arguments, run on this CPU host: the model is the tiny
    local one; the block size a multiple of 32 (vLLM's CPU backend needs it); NIXL's KV
    buffers in host memory, with the one-thread, non-spinning agent a 2-core host needs; the
    KV cache capped so that the workload below does not fit in one engine."""
    args: list[str] = []
    for arg in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["command"]:
        flag, _, value = arg.partition("=")
        if flag == "--model":
            value = str(model_dir)
        elif flag == "--served-model-name":
            value = MODEL_NAME
        elif flag == "--block-size":
            value = str(BLOCK_SIZE)
        elif flag == "--kv-events-config":
            assert "tcp://*:5557" in value
            value = value.replace("tcp://*:5557", f"tcp://*:{events_port}")
        elif flag == "--kv-transfer-config":
            given = json.loads(value)
            assert given["kv_connector"] == NIXL_TRANSFER_CONFIG["kv_connector"]
            assert given["kv_role"] == NIXL_TRANSFER_CONFIG["kv_role"]
            value = json.dumps({**given, **NIXL_TRANSFER_CONFIG})
        args.append(f"{flag}={value}" if value else flag)
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args,
        "--host", "127.0.0.1", "--port", str(port),
        "--num-gpu-blocks-override", str(BLOCKS_PER_ENGINE), "--max-model-len", "4096",
    ]  # fmt: skip


def compose_engine_env(service: str, core: int) -> dict[str, str]:
    env = dict(os.environ)
    given = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service].get("environment", {})
    env.update({k: str(v) for k, v in given.items() if not k.startswith("HF_")})
    # One host instead of one per service: the side channel on loopback, a port each.
    env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
    env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
    env.update(NIXL_CPU_ENV)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    return env


def start_engine(service: str, model_dir: Path, core: int) -> UserEngine:
    port, events_port = free_port(), free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / f"{service}.log", "ab") as log:
        process = subprocess.Popen(
            compose_engine_command(service, model_dir, port, events_port),
            env=compose_engine_env(service, core),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            # An engine per core, as an engine per GPU: NIXL engines keep their core busy a while.
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),  # noqa: PLW1509
        )  # fmt: skip
    return UserEngine(service, port, events_port, process)


def engine_ready(engine: UserEngine) -> bool:
    if engine.process.poll() is not None:
        log = (LOG_DIR / f"{engine.name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"engine {engine.name} exited during start-up:\n{log}")
    try:
        return httpx.get(f"{engine.url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def user_engines(tiny_model_dir: Path) -> Iterator[list[UserEngine]]:
    cores = os.cpu_count() or 1
    engines: list[UserEngine] = []
    try:
        for i in range(2):
            engines.append(start_engine(f"engine-{i}", tiny_model_dir, i % cores))
        wait_until(lambda: all(engine_ready(e) for e in engines), 400, "the engines to serve")
        yield engines
    finally:
        for engine in engines:
            stop_process_group(engine.process)


def readme_yaml() -> str:
    """The YAML README.md shows under "Engines you already run"."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Engines you already run"):]
    return section[section.index("```yaml\n") + len("```yaml\n"):section.index("\n```", section.index("```yaml"))]


def readme_config(engines: list[UserEngine], **extra: Any) -> GatewayConfig:
    text = readme_yaml()
    urls = re.findall(r"http://[\w.:-]+", text)
    assert len(urls) == len(engines)
    for url, engine in zip(urls, engines):
        text = text.replace(url, engine.url)
    return parse_config({**yaml.safe_load(text), **extra}, "README.md")


def compose_config(engines: list[UserEngine]) -> GatewayConfig:
    text = (ROOT / "configs" / "compose.yaml").read_text()
    for engine in engines:
        text = text.replace(f"{engine.name}:8000", f"127.0.0.1:{engine.port}")
        text = text.replace(f"{engine.name}:5557", f"127.0.0.1:{engine.events_port}")
    assert "engine-0:" not in text and "engine-1:" not in text
    return parse_config(yaml.safe_load(text), "configs/compose.yaml")


CONFIGS = {
    "readme": lambda engines: readme_config(engines),
    "compose": compose_config,
    "engine": lambda engines: readme_config(engines, models=[{"name": MODEL_NAME, "tokenizer": "engine"}]),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def deployment(request: pytest.FixtureRequest, user_engines: list[UserEngine]) -> Iterator[tuple[str, GatewayServer]]:
    with GatewayServer(CONFIGS[request.param](user_engines)) as gateway:
        yield request.param, gateway


def engine_token_ids(engine: UserEngine, body: dict[str, Any]) -> list[int]:
    """What the engine computes, asked directly (every vLLM server serves /tokenize)."""
    resp = httpx.post(f"{engine.url}/tokenize", json={"model": MODEL_NAME, **body}, timeout=30)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["tokens"])


def client_for(gateway: GatewayServer | GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_health_is_ok_and_what_the_yaml_left_out_was_found(deployment: tuple[str, GatewayServer]) -> None:
    name, gateway = deployment
    health = httpx.get(f"{gateway.url}/health").json()
    assert health["status"] == "ok" and health["problems"] == [], health
    assert gateway.app.state.runtime.layout.block_size == BLOCK_SIZE  # from the engines' metrics
    assert gateway.config.routing.policy in ("prefix", "kv_aware")
    status = gateway.app.state.runtime.tokenizers.status[MODEL_NAME]
    # Where the gateway can read the model's files (the engines' `root`), it tokenizes locally.
    assert status.ok and status.source.startswith("engine" if name == "engine" else "local")
    assert gateway.metric("gateway_tokenizer_ready", model=MODEL_NAME) == 1
    # Every engine's KV events are followed, found through /kv_event_sources where not listed.
    assert set(gateway.app.state.runtime.feeds.subscribers) == {"engine-0", "engine-1"}


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_chat_token_ids_equal_the_engines(deployment: tuple[str, GatewayServer], user_engines: list[UserEngine],
                                          index: int) -> None:  # fmt: skip
    _, gateway = deployment
    body = {k: v for k, v in CHATS[index].items() if k != "tool_choice"}
    expected = engine_token_ids(user_engines[0], body)
    check_token_ids(gateway, CHAT_PATH, {"model": MODEL_NAME, **CHATS[index]}, expected)


@pytest.mark.parametrize("index", range(len(COMPLETIONS)))
def test_completion_token_ids_equal_the_engines(deployment: tuple[str, GatewayServer], user_engines: list[UserEngine],
                                                index: int) -> None:  # fmt: skip
    _, gateway = deployment
    prompt = COMPLETIONS[index]
    expected = prompt if isinstance(prompt, list) else engine_token_ids(user_engines[0], {"prompt": prompt})
    check_token_ids(gateway, COMPLETIONS_PATH, {"model": MODEL_NAME, "prompt": prompt}, expected)


def check_token_ids(gateway: GatewayServer, path: str, body: dict[str, Any], expected: list[int]) -> None:
    tokenizer = gateway.app.state.runtime.tokenizers.for_model(MODEL_NAME)
    if isinstance(tokenizer, HFPromptTokenizer):
        assert tokenizer.token_ids_sync(path, body) == expected
    # Through the request path, whatever tokenizes: the gateway's count is the engine's. A
    # long prompt no engine holds is routed on its head (its count estimated, no header); sent
    # again, an engine holds that head and the gateway reads all of it.
    for _ in range(2):
        resp = httpx.post(f"{gateway.url}{path}", json={**body, "max_tokens": 1}, timeout=60)
        assert resp.status_code == 200, resp.text
        if "x-gateway-prompt-tokens" in resp.headers:
            break
    assert int(resp.headers["x-gateway-prompt-tokens"]) == resp.json()["usage"]["prompt_tokens"] == len(expected)


def test_shared_system_prompts_are_served_from_cache(deployment: tuple[str, GatewayServer],
                                                      user_engines: list[UserEngine]) -> None:  # fmt: skip
    """Groups that each share a long system prompt, several turns each, one request after
    another; more groups than one engine's cache holds. An unknown model name is asked for
    between rounds: it must be refused and change nothing."""
    name, gateway = deployment
    share, placements = replay_groups(gateway, user_engines, seed=20_000 + 100 * sorted(CONFIGS).index(name))
    print(f"{name}: {share:.1%} of the reusable prompt tokens served from cache; placements {placements}")
    assert share >= 0.95, (share, placements)
    assert gateway.metric("gateway_tokenization_failures_total") == 0
    assert httpx.get(f"{gateway.url}/health").json()["status"] == "ok"


def test_two_workers_keep_the_cache(user_engines: list[UserEngine]) -> None:
    """`server.workers: 2`, started as users start it: each worker follows the engines' events
    and both share each engine's load; the prefix groups stay cached whichever worker routes."""
    config = yaml.safe_load(readme_config(user_engines).model_dump_json(exclude_defaults=True))
    config["server"] = {"workers": 2}
    with GatewayProcess(config, LOG_DIR / "gateway-2-workers.log") as gateway:
        share, placements = replay_groups(gateway, user_engines, seed=22_000)
        served = gateway.metric("gateway_requests_total")
        health = httpx.get(f"{gateway.url}/health").json()
    print(f"2 workers: {share:.1%} of the reusable prompt tokens served from cache; placements {placements}")
    assert share >= 0.95, (share, placements)
    assert served == NUM_GROUPS * NUM_TURNS  # /metrics adds up both workers
    assert health["status"] == "ok"


def test_the_workload_needs_prefix_routing(user_engines: list[UserEngine]) -> None:
    """The control: the same workload through a router blind to prefixes keeps far less."""
    config = readme_config(user_engines, routing={"policy": "round_robin"})
    with GatewayServer(config) as gateway:
        share, placements = replay_groups(gateway, user_engines, seed=21_000)
    print(f"round_robin control: {share:.1%} of the reusable prompt tokens served from cache")
    assert share < 0.8, (share, placements)


def replay_groups(gateway: GatewayServer | GatewayProcess, engines: list[UserEngine], seed: int) -> tuple[float, dict[int, set[str]]]:
    """(share of the reusable prompt tokens the engines served from cache, engines per group).
    Seeds keep each run's prefixes apart from what other runs cached."""
    client = client_for(gateway)
    systems = [text_of(seed + g, 700) for g in range(NUM_GROUPS)]
    history: list[list[dict[str, str]]] = [[{"role": "system", "content": s}] for s in systems]
    seen: list[list[list[int]]] = [[] for _ in range(NUM_GROUPS)]
    reusable_tokens = cached_tokens = 0
    placements: dict[int, set[str]] = {g: set() for g in range(NUM_GROUPS)}
    for turn in range(NUM_TURNS):
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="no-such-model", messages=history[0] + [
                {"role": "user", "content": "hello"}], max_tokens=1)  # fmt: skip
        assert refused.value.status_code == 404 and "no-such-model" in str(refused.value)
        for g in range(NUM_GROUPS):
            history[g].append({"role": "user", "content": f"Turn {turn}: " + text_of(seed + 50 + 10 * g + turn, 40)})
            token_ids = engine_token_ids(engines[0], {"messages": history[g]})
            raw = client.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=history[g],  # type: ignore[arg-type]
                                                                   max_tokens=1)  # fmt: skip
            reply = raw.parse()
            placements[g].add(raw.headers["x-gateway-engine"])
            assert reply.usage is not None and reply.usage.prompt_tokens == len(token_ids)
            details = reply.usage.prompt_tokens_details
            cached_tokens += (details.cached_tokens or 0) if details is not None else 0
            reusable_tokens += reusable(token_ids, seen[g])
            seen[g].append(token_ids)
            history[g].append({"role": "assistant", "content": text_of(seed + 90 + 10 * g + turn, 20)})
    assert reusable_tokens > NUM_GROUPS * (NUM_TURNS - 1) * 1000  # the test measures something
    return cached_tokens / reusable_tokens, placements


def reusable(token_ids: list[int], earlier: list[list[int]]) -> int:
    """Tokens of this prompt a perfect router could serve from cache: its longest common
    prefix with an earlier prompt of the group, in whole blocks, never the last token."""
    best = 0
    for other in earlier:
        common = 0
        for a, b in zip(token_ids, other):
            if a != b:
                break
            common += 1
        best = max(best, common)
    return min(best, len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
