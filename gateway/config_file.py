"""The configuration file the gateway runs from, read at start-up and again on every reload
(gateway.reload).

What start-up adds to the file applies to every later reading too, so that a reload compares
like with like: `--port`, and the engines `local_engines:` started (put in front of
`engines`, their model tokenized with the files they load). Every reading also builds the
routing policy once, so an unknown policy or scorer is refused like any other bad field.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict

from gateway.config import (
    ConfigError,
    EngineConfig,
    GatewayConfig,
    LocalEnginesConfig,
    ModelConfig,
    parse_config_text,
    read_config_text,
)
from gateway.routing.registry import check_routing


class ConfigFile(BaseModel):
    # Serialized for the worker processes (gateway.workers), which reload on their own.
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    # `--port`: replaces `server.port`.
    port: int | None = None
    # The engines the CLI started for `local_engines:`, and their model's tokenizer entry.
    local_engines: tuple[EngineConfig, ...] = ()
    local_model: ModelConfig | None = None

    def with_local_engines(self, engines: list[EngineConfig], local: LocalEnginesConfig) -> ConfigFile:
        # The gateway tokenizes locally with the very files the engines load.
        model = ModelConfig(name=local.served_model_name, tokenizer=local.model_dir)
        return self.model_copy(update={"local_engines": tuple(engines), "local_model": model})

    def read_text(self) -> str:
        return read_config_text(self.path)

    @staticmethod
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def parse(self, text: str) -> GatewayConfig:
        """The configuration `text` (this file's content) describes, as the gateway runs it.
        ConfigError, naming the field, when it cannot run."""
        config = self.resolve(parse_config_text(text, self.path))
        try:
            check_routing(config.routing)
        except ConfigError as exc:
            raise ConfigError(f"invalid configuration in {self.path}: {exc}") from None
        return config

    def read(self) -> tuple[GatewayConfig, str]:
        """(the configuration, the digest of the text it was read from)."""
        text = self.read_text()
        return self.parse(text), self.digest(text)

    def resolve(self, config: GatewayConfig) -> GatewayConfig:
        """`config` with what start-up added; applying it twice changes nothing more."""
        updates: dict[str, object] = {}
        if self.port is not None:
            updates["server"] = config.server.model_copy(update={"port": self.port})
        if self.local_engines:
            listed = [e for e in config.engines if e not in self.local_engines]
            taken = {e.name for e in self.local_engines} & {e.name for e in listed}
            if taken:
                raise ConfigError(f"invalid configuration in {self.path}: engines: {', '.join(sorted(taken))} "
                                  f"is the name of an engine local_engines started")  # fmt: skip
            updates["engines"] = [*self.local_engines, *listed]
        if self.local_model is not None and not any(m.name == self.local_model.name for m in config.models):
            updates["models"] = [*config.models, self.local_model]
        return config.model_copy(update=updates) if updates else config
