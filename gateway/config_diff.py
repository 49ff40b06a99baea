"""What a reload changes: the running configuration against a new one, without side effects.

Most settings change live. Those the process is built around (the listening socket, the worker
count, the engines it started, the index's size and key layout) keep their running values
until a restart: `RESTART_ONLY` lists them, and the change names each one that differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from gateway.config import EngineConfig, GatewayConfig

# Dotted paths into GatewayConfig; a whole section where it has no path below it.
RESTART_ONLY: tuple[str, ...] = (
    "server.host",
    "server.port",
    "server.workers",
    "server.access_log",
    "local_engines",
    "kv_index.block_size",
    "kv_index.backend",
    "kv_index.capacity_chunks",
    "kv_index.working_set_window_s",
    "kv_index.tokenize_offload_min_chars",
    "kv_index.tokenize_head_chars",
    "kv_index.replay_timeout_s",
    # The server's own limits live in its protocol and admission middleware, built at start.
    "limits",
)


@dataclass(frozen=True, slots=True)
class EngineChanges:
    added: tuple[EngineConfig, ...] = ()
    removed: tuple[EngineConfig, ...] = ()
    # Same name and url, other settings: the same engine, its settings changed in place.
    updated: tuple[tuple[EngineConfig, EngineConfig], ...] = ()  # (running, new)
    # Same name, another url: another engine under that name, so removed and then added.
    replaced: tuple[tuple[EngineConfig, EngineConfig], ...] = ()  # (running, new)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated or self.replaced)

    def describe(self) -> str:
        """`+added -removed ~updated ±replaced` engine names, for the log."""
        parts = [f"+{e.name}" for e in self.added] + [f"-{e.name}" for e in self.removed]
        parts += [f"~{new.name}" for _, new in self.updated] + [f"±{new.name}" for _, new in self.replaced]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class ConfigChange:
    # What to run: the new configuration with the restart-only fields at their running values.
    config: GatewayConfig
    engines: EngineChanges = field(default_factory=EngineChanges)
    # Top-level sections whose live settings differ (`engines` included).
    sections: tuple[str, ...] = ()
    # Restart-only fields that differ: "server.port (8000 -> 9000)".
    needs_restart: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.sections


def diff_configs(running: GatewayConfig, new: GatewayConfig) -> ConfigChange:
    config, needs_restart = _keep_restart_only(running, new)
    sections = tuple(name for name in GatewayConfig.model_fields if getattr(running, name) != getattr(config, name))
    return ConfigChange(config, diff_engines(running.engines, config.engines), sections, needs_restart)


def diff_engines(running: list[EngineConfig], new: list[EngineConfig]) -> EngineChanges:
    before = {e.name: e for e in running}
    after = {e.name: e for e in new}
    return EngineChanges(
        added=tuple(e for e in new if e.name not in before),
        removed=tuple(e for e in running if e.name not in after),
        updated=tuple((before[e.name], e) for e in new
                      if e.name in before and before[e.name] != e and before[e.name].url == e.url),
        replaced=tuple((before[e.name], e) for e in new if e.name in before and before[e.name].url != e.url),
    )  # fmt: skip


def _keep_restart_only(running: GatewayConfig, new: GatewayConfig) -> tuple[GatewayConfig, tuple[str, ...]]:
    differing = []
    for path in RESTART_ONLY:
        kept, wanted = _get(running, path), _get(new, path)
        if kept != wanted:
            differing.append(f"{path} ({_show(kept)} -> {_show(wanted)})")
            new = _set(new, path, kept)
    return new, tuple(differing)


def _get(config: GatewayConfig, path: str) -> Any:
    section, _, key = path.partition(".")
    value = getattr(config, section)
    return getattr(value, key) if key else value


def _set(config: GatewayConfig, path: str, value: Any) -> GatewayConfig:
    section, _, key = path.partition(".")
    if key:
        value = getattr(config, section).model_copy(update={key: value})
    return config.model_copy(update={section: value})


def _show(value: Any) -> str:
    if isinstance(value, BaseModel):
        return str(value.model_dump(exclude_defaults=True))
    return repr(value)
