from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.cli import main
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
        ({"engines": [{**ENGINE, "kv_store": "a b"}]}, "engines.0.kv_store"),
        ({"engines": [{**ENGINE, "name": "kv-store:x"}]}, "engines.0.name"),
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
    with pytest.raises(ConfigError, match=r"^routing.scorers.0.kv_cache_weight: Input should be greater") as info:
        build_scorers(config.routing, ScorerContext())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("routing", "named"),
    [
        ({"policy": "fastest"}, "routing.policy: unknown preset 'fastest'"),
        ({"scorers": [{"name": "magic"}]}, "routing.scorers.0.name: unknown scorer 'magic'"),
        ({"scorers": [{"name": "prefix", "min_match_tokens": -3}]}, "routing.scorers.0.min_match_tokens"),
    ],
)
def test_a_policy_that_cannot_be_built_stops_start_up_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], routing: dict[str, object], named: str
) -> None:
    """Before anything starts for it: not even the local engines."""
    path = tmp_path / "gateway.yaml"
    model_dir = tmp_path / "model"
    path.write_text(yaml.safe_dump({"local_engines": {"count": 1, "model_dir": str(model_dir)}, "routing": routing}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"invalid configuration in {path}: {named}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not model_dir.exists()


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
