"""Several worker processes on one port (`server.workers: N`), one core each.

The parent (`gateway.cli`) resolves the configuration (local engines started), writes it to a
file, creates the state file the workers share (gateway.endpoints.shared: each engine's
in-flight count per worker, drain flags, by engine name) and a directory for the workers'
metrics, then lets uvicorn's supervisor start N processes on one listening socket; each calls
`create_app`.

Each worker is a whole gateway: its own health checks, its own subscription to every engine's
KV events (ZMQ fan-out), hence its own index, tokenizers and cost model. What a worker knows
alone: the speculative entries it wrote (until the engine's own events reach every worker, a
few milliseconds after the prefill), the refreshes of the working sets it routed (the blocks
an engine stores join its working set in every worker), and the Responses ids it saw (the ids
the gateway names say their engine to any worker: gateway.proxy.response_affinity).
Workers start serving together (`runtime.wait_for_other_workers`): an engine announces a block
once, so a worker still subscribing while another served would never learn those blocks.

Each worker also follows the configuration file itself (gateway.reload): it reads the file
when it changes, and on SIGHUP, which the parent forwards to every worker (`run_supervisor`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from gateway.config import GatewayConfig, parse_config
from gateway.config_file import ConfigFile
from gateway.listen import bind

CONFIG_ENV = "PREFIX_GATEWAY_CONFIG"
SHARED_ENV = "PREFIX_GATEWAY_SHARED"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"

logger = logging.getLogger(__name__)


@contextmanager
def worker_environment(config: GatewayConfig, file: ConfigFile | None = None, digest: str = "") -> Iterator[dict[str, str]]:
    """Files and variables for `config.server.workers` workers; removed afterwards. With
    `file` (read into `config`; its text's digest: `digest`), the workers follow it."""
    from gateway.endpoints.shared import SharedFleetState

    with tempfile.TemporaryDirectory(prefix="prefix-gateway-") as scratch:
        root = Path(scratch)
        config_path = root / "config.json"
        config_path.write_text(json.dumps({
            "config": config.model_dump(mode="json"),
            "file": None if file is None else file.model_dump(mode="json"),
            "digest": digest,
        }))  # fmt: skip
        # Twice the workers: a worker uvicorn restarts may start before the old one is reaped.
        shared = SharedFleetState.create(root / "fleet.state", rows=2 * config.server.workers)
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
    from gateway.cli import configure_logging
    from gateway.endpoints.shared import SharedFleetState

    configure_logging()
    # A SIGHUP the parent forwards while this worker starts must not kill it: the file is
    # read again once it serves (gateway.reload compares its content with `digest`).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    data: Any = json.loads(Path(os.environ[CONFIG_ENV]).read_text())
    config = parse_config(data["config"], os.environ[CONFIG_ENV])
    file = None if data["file"] is None else ConfigFile.model_validate(data["file"])
    shared = SharedFleetState.attach(os.environ[SHARED_ENV])
    app = build_app(config, shared=shared, config_file=file, config_digest=data["digest"], freeze_gc=True)
    app.state.shared = shared
    return app


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, except that SIGHUP goes to the workers, each of which reloads the
    configuration itself, keeping its index, health and connections. uvicorn's own answer to
    SIGHUP (`restart_all`, uvicorn 0.30+) starts every worker over, with an empty index and
    the configuration the gateway started with."""

    def handle_hup(self) -> None:
        logger.info("SIGHUP: the workers read the configuration again")
        for process in self.processes:
            if process.pid is not None:
                try:
                    os.kill(process.pid, signal.SIGHUP)
                except ProcessLookupError:  # exited; the supervisor starts another
                    pass


def run_supervisor(config: uvicorn.Config) -> None:
    """What `uvicorn.run(..., workers=N)` does, with `_Supervisor`."""
    sockets = bind(config)
    try:
        options: dict[str, Any] = {"sockets": sockets}
        if "target" in inspect.signature(Multiprocess.__init__).parameters:  # uvicorn before 0.4x
            options["target"] = uvicorn.Server(config).run
        _Supervisor(config, **options).run()
    finally:
        for sock in sockets:
            sock.close()
