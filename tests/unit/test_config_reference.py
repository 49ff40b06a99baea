"""docs/config.md documents every configuration key, with the default the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.config import (
    ElasticConfig,
    EngineConfig,
    GatewayConfig,
    HealthConfig,
    KVIndexConfig,
    KVTransferConfig,
    LimitsConfig,
    LocalEnginesConfig,
    ModelConfig,
    OutlierDetectionConfig,
    ProxyConfig,
    RoutingConfig,
    ServerConfig,
)

DOC = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerConfig, "limits": LimitsConfig, "engines": EngineConfig, "local_engines": LocalEnginesConfig, "models": ModelConfig,
    "kv_index": KVIndexConfig, "kv_transfer": KVTransferConfig, "elastic": ElasticConfig, "routing": RoutingConfig, "proxy": ProxyConfig,
    "health": HealthConfig, "outlier_detection": OutlierDetectionConfig,
}  # fmt: skip


def section_rows(name: str) -> dict[str, str]:
    """key -> documented default, from the table under the section's heading."""
    match = re.search(rf"^## `{name}`.*?$(.*?)(?=^## )", DOC, re.S | re.M)
    assert match, f"docs/config.md has no section for `{name}`"
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", match.group(1), re.M)
    return {key: default.strip() for key, default in rows}


def test_every_section_is_documented() -> None:
    assert set(SECTIONS) == set(GatewayConfig.model_fields)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_key_is_documented_with_its_default(name: str) -> None:
    rows = section_rows(name)
    fields = SECTIONS[name].model_fields
    assert set(rows) == set(fields), f"`{name}`: documented {sorted(rows)}, code has {sorted(fields)}"
    for key, field in fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, float):
            shown = f"{default:g}"
        elif isinstance(default, (int, str)):
            shown = str(default)
        else:  # none, lists, mappings: described in words
            continue
        assert rows[key].strip("`") == shown, f"`{name}.{key}`: documented {rows[key]}, code {default!r}"


def test_warm_on_join_is_documented_to_cover_restarted_engines() -> None:
    # The runtime warms an engine that restarted (an empty cache) under the same switch.
    match = re.search(r"^\| `warm_on_join` \| [^|]* \| ([^|]*) \|", DOC, re.M)
    assert match and "restart" in match.group(1)
