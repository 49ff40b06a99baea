"""Several worker processes on one port (`server.workers: N`), one core each.

The parent (`gateway.cli`) resolves the configuration (local engines started), writes it to a
file, creates the state file the workers share (gateway.endpoints.shared: each engine's
in-flight count per worker, drain flags) and a directory for the workers' metrics, then lets
uvicorn start N processes on one listening socket; each calls `create_app`.

Each worker is a whole gateway: its own health checks, its own subscription to every engine's
KV events (ZMQ fan-out), hence its own index, tokenizers and cost model. What a worker knows
alone: the speculative entries it wrote (until the engine's own events reach every worker, a
few milliseconds after the prefill), the working sets it routed, and the Responses ids it
saw (the ids the gateway names say their engine to any worker: gateway.proxy.response_affinity).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from gateway.config import GatewayConfig, parse_config

CONFIG_ENV = "PREFIX_GATEWAY_CONFIG"
SHARED_ENV = "PREFIX_GATEWAY_SHARED"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def worker_environment(config: GatewayConfig) -> Iterator[dict[str, str]]:
    """Files and variables for `config.server.workers` workers; removed afterwards."""
    from gateway.endpoints.shared import SharedFleetState

    with tempfile.TemporaryDirectory(prefix="prefix-gateway-") as scratch:
        root = Path(scratch)
        config_path = root / "config.json"
        config_path.write_text(json.dumps(config.model_dump(mode="json")))
        # Twice the workers: a worker uvicorn restarts may start before the old one is reaped.
        shared = SharedFleetState.create(root / "fleet.state", 2 * config.server.workers, len(config.engines))
        metrics_dir = root / "metrics"
        metrics_dir.mkdir()
        env = {CONFIG_ENV: str(config_path), SHARED_ENV: str(shared), METRICS_ENV: str(metrics_dir)}
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def create_app() -> FastAPI:
    """uvicorn's app factory in each worker process."""
    from gateway.app import build_app
    from gateway.endpoints.shared import SharedFleetState

    data: Any = json.loads(Path(os.environ[CONFIG_ENV]).read_text())
    config = parse_config(data, os.environ[CONFIG_ENV])
    shared = SharedFleetState.attach(os.environ[SHARED_ENV])
    app = build_app(config, shared=shared, freeze_gc=True)
    app.state.shared = shared
    return app
