"""Turn the `routing:` section of the YAML into scorer instances with weights."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from pydantic import ValidationError

from gateway.config import ConfigError, RoutingConfig, ScorerConfig
from gateway.routing import scorers as builtin_scorers
from gateway.routing.base import SCORERS, Scorer, ScorerContext

# Presets: the names operators use most, as scorer lists. A small least_loaded term breaks
# ties so that, for example, requests without a session header still spread by load.
PRESETS: dict[str, list[dict[str, object]]] = {
    "round_robin": [{"name": "round_robin", "weight": 1.0}],
    "least_loaded": [{"name": "least_loaded", "weight": 1.0}],
    "session": [{"name": "session", "weight": 1.0}, {"name": "least_loaded", "weight": 0.01}],
    # Cached prefix first; new prefix groups go where their working set fits; load breaks ties.
    "prefix": [
        {"name": "prefix", "weight": 1.0},
        {"name": "capacity", "weight": 0.3},
        {"name": "least_loaded", "weight": 0.2},
    ],
    # Estimated time to first token (queue + uncached prefill), with the same capacity term and
    # some prefix affinity as hysteresis: the queue estimate is noisy, and moving a prefix to
    # another engine for a small estimated gain duplicates it and costs hits later.
    "kv_aware": [
        {"name": "kv_aware", "weight": 1.0},
        {"name": "prefix", "weight": 0.5},
        {"name": "capacity", "weight": 0.5},
    ],
}


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


def load_builtin_scorers() -> None:
    for module in pkgutil.iter_modules(builtin_scorers.__path__):
        importlib.import_module(f"{builtin_scorers.__name__}.{module.name}")


def build_scorers(config: RoutingConfig, context: ScorerContext) -> list[WeightedScorer]:
    load_builtin_scorers()
    if config.scorers is not None:
        entries, where = config.scorers, "routing.scorers"
    else:
        assert config.policy is not None
        if config.policy not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ConfigError(f"routing.policy: unknown preset {config.policy!r} (known: {known})")
        entries = [ScorerConfig.model_validate(e) for e in PRESETS[config.policy]]
        where = f"routing.policy[{config.policy}]"
    built = []
    for i, entry in enumerate(entries):
        cls = SCORERS.get(entry.name)
        if cls is None:
            known = ", ".join(sorted(SCORERS))
            raise ConfigError(f"{where}.{i}.name: unknown scorer {entry.name!r} (known: {known})")
        try:
            params = cls.Params.model_validate(entry.params)
        except ValidationError as exc:
            # One line, each field by its dotted path (routing.scorers.0.min_match_tokens).
            raise ConfigError("; ".join(
                f"{where}.{i}.{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
            )) from None  # fmt: skip
        built.append(WeightedScorer(cls(params, context), entry.weight))
    return built


def check_routing(config: RoutingConfig) -> None:
    """ConfigError naming the field when the policy cannot be built (unknown preset or scorer,
    bad scorer parameters): for checking a configuration before anything is started for it."""
    build_scorers(config, ScorerContext())


def policy_label(config: RoutingConfig) -> str:
    if config.policy is not None:
        return config.policy
    return "+".join(s.name for s in config.scorers or [])
