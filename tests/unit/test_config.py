from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config
from gateway.routing.base import ScorerContext
from gateway.routing.registry import build_scorers

ENGINE = {"name": "e0", "url": "http://127.0.0.1:8100"}


def test_minimal_config_gets_defaults() -> None:
    config = parse_config({"engines": [ENGINE]})
    assert config.server.port == 8000
    # The product's point: with no routing section, routing is prefix-aware, and the block
    # size is read from the engines rather than guessed.
    assert config.routing.policy == "prefix"
    assert config.kv_index.block_size is None
    assert config.models == []
    assert config.proxy.max_retries == 2


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"engines": [{"name": "e0", "url": "127.0.0.1:8100"}]}, "engines.0.url"),
        ({"engines": [ENGINE], "proxy": {"max_retries": -1}}, "proxy.max_retries"),
        ({"engines": [ENGINE], "proxy": {"connect_timout_s": 1}}, "proxy.connect_timout_s"),
        ({"engines": [ENGINE], "routing": {"scorers": [{"name": "session", "weight": "heavy"}]}}, "routing.scorers.0.weight"),
        ({"engines": [ENGINE, ENGINE]}, "unique"),
        ({}, "at least one engine"),
        ({"local_engines": {"block_size": 16}}, "local_engines.block_size"),
        ({"engines": [ENGINE], "routing": {"policy": "least_loaded", "scorers": [{"name": "session"}]}}, "not both"),
    ],
)
def test_invalid_config_names_the_field(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "gateway.yaml")
    assert fragment in str(info.value)
    assert "gateway.yaml" in str(info.value)


def test_unknown_policy_and_scorer_are_named() -> None:
    config = parse_config({"engines": [ENGINE], "routing": {"policy": "fastest"}})
    with pytest.raises(ConfigError, match="routing.policy: unknown preset 'fastest'"):
        build_scorers(config.routing, ScorerContext())
    config = parse_config({"engines": [ENGINE], "routing": {"scorers": [{"name": "magic"}]}})
    with pytest.raises(ConfigError, match=r"routing.scorers.0.name: unknown scorer 'magic'"):
        build_scorers(config.routing, ScorerContext())


def test_scorer_parameters_are_validated() -> None:
    config = parse_config(
        {"engines": [ENGINE], "routing": {"scorers": [{"name": "least_loaded", "kv_cache_weight": -2}]}}
    )
    with pytest.raises(ConfigError, match="kv_cache_weight"):
        build_scorers(config.routing, ScorerContext())


def test_yaml_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("engines: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    shipped = sorted(root.glob("*.yaml"))
    assert shipped
    for path in shipped:
        config = load_config(path)
        build_scorers(config.routing, ScorerContext())
