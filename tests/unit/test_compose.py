"""docker-compose.yml cannot run here (no Docker engine); check it says what the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gateway.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_wires_gateway_and_two_engines() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "engine-0", "engine-1"} <= set(services)
    gateway = services["gateway"]
    assert "8000:8000" in gateway["ports"]
    assert any(v.startswith("./configs/compose.yaml:") for v in gateway["volumes"])
    config_path = next(v for v in gateway["volumes"] if v.startswith("./configs/")).split(":")[1]
    assert gateway["command"][-1] == config_path
    for name in ("engine-0", "engine-1"):
        engine = services[name]
        assert engine["image"].startswith("vllm/vllm-openai")
        args = " ".join(engine["command"])
        assert "--enable-prefix-caching" in args
        assert "--enable-prompt-tokens-details" in args
        assert '"enable_kv_cache_events":true' in args and "tcp://*:5557" in args
        assert '"kv_connector":"NixlConnector"' in args
        assert engine["environment"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == name
        assert engine["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_the_kv_store_override_adds_one_lmcache_server_and_its_connector() -> None:
    """docker-compose.kv-store.yml over docker-compose.yml: the engines' arguments are the
    default's but for the KV connectors (NIXL beside LMCache's), and the gateway's YAML is
    the default's with both engines on store `shared`."""
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    override = yaml.safe_load((ROOT / "docker-compose.kv-store.yml").read_text())["services"]
    store = override["kv-store"]
    assert store["entrypoint"] == ["lmcache", "server"]
    args = " ".join(store["command"])
    assert "--port=5555" in args and "--chunk-size=256" in args and "--eviction-policy=LRU" in args
    assert store["environment"]["LMCACHE_TRACK_USAGE"] == "false" and store["ipc"] == "host"
    for name in ("engine-0", "engine-1"):
        engine = override[name]
        assert engine["image"].startswith("lmcache/vllm-openai") and engine["depends_on"] == ["kv-store"]
        assert engine["environment"]["LMCACHE_TRACK_USAGE"] == "false"
        connectors = [a for a in engine["command"] if a.startswith("--kv-transfer-config=")]
        assert [a for a in engine["command"] if a not in connectors] == [
            a for a in base[name]["command"] if not a.startswith("--kv-transfer-config=")
        ]
        given = json.loads(connectors[0].partition("=")[2])
        assert given["kv_connector"] == "MultiConnector"
        inner = {c["kv_connector"]: c for c in given["kv_connector_extra_config"]["connectors"]}
        assert set(inner) == {"NixlConnector", "LMCacheMPConnector"}
        assert inner["LMCacheMPConnector"]["kv_connector_extra_config"] == {
            "lmcache.mp.host": "tcp://kv-store", "lmcache.mp.port": 5555
        }
    mounted = override["gateway"]["volumes"][0].split(":")
    assert mounted[:2] == ["./configs/compose-kv-store.yaml", "/etc/gateway/gateway.yaml"]
    default = load_config(ROOT / "configs" / "compose.yaml")
    with_store = load_config(ROOT / "configs" / "compose-kv-store.yaml")
    assert {e.kv_store for e in with_store.engines} == {"shared"}
    assert [e.model_copy(update={"kv_store": None}) for e in with_store.engines] == default.engines
    assert with_store.model_copy(update={"engines": default.engines}) == default


def test_compose_gateway_config_points_at_the_services() -> None:
    config = load_config(ROOT / "configs" / "compose.yaml")
    assert config.server.port == 8000
    assert [e.url for e in config.engines] == ["http://engine-0:8000", "http://engine-1:8000"]
    assert [e.kv_events_endpoint for e in config.engines] == ["tcp://engine-0:5557", "tcp://engine-1:5557"]
    assert all(e.kv_transfer for e in config.engines) and config.kv_transfer.enabled
    assert {e.kv_store for e in config.engines} == {None}
    # The block size and the tokenizer come from the engines: nothing to keep in step by hand.
    assert config.routing.policy == "kv_aware" and config.kv_index.block_size is None
    assert config.models == []


def test_compose_gateway_reads_the_engines_tokenizer_files_offline() -> None:
    gateway = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]
    assert any(v.endswith(":/root/.cache/huggingface:ro") for v in gateway["volumes"])
    assert gateway["environment"]["HF_HUB_OFFLINE"] == "1"


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme and "docker compose up" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
