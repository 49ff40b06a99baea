"""`python -m gateway --config configs/local.yaml`: run the gateway in the foreground.

With a `local_engines:` section, the gateway first builds the tiny test model (once), starts
that many CPU vLLM engines and puts them in front of any `engines:` listed; Ctrl-C or SIGTERM
stops the gateway and then the engines it started.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from gateway.config import ConfigError, EngineConfig, GatewayConfig, LocalEnginesConfig, ModelConfig, load_config

logger = logging.getLogger("gateway")


def local_engine_configs(local: LocalEnginesConfig) -> tuple[list[EngineConfig], object]:
    """Build the model, start the engines; returns their configs and the running fleet."""
    from engine_adapter.launch.launcher import EngineFleet, local_specs
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    logger.info("building/checking the tiny test model in %s", local.model_dir)
    ensure_tiny_model(local.model_dir)
    specs = local_specs(
        local.count,
        model_dir=local.model_dir,
        served_model_name=local.served_model_name,
        host=local.host,
        base_port=local.base_port,
        kv_events_base_port=local.kv_events_base_port,
        block_size=local.block_size,
        kv_cache_gib=local.kv_cache_gib,
        max_model_len=local.max_model_len,
        extra_args=local.extra_args,
        kv_transfer_base_port=local.kv_transfer_base_port if local.kv_transfer else None,
    )
    fleet = EngineFleet(specs, local.log_dir)
    logger.info("starting %d CPU vLLM engines (logs in %s); this takes about a minute", len(specs), local.log_dir)
    fleet.start(timeout_s=local.startup_timeout_s)
    engines = [
        EngineConfig(
            name=s.name,
            url=s.url,
            kv_events_endpoint=s.kv_events_endpoint,
            models=[s.served_model_name],
            kv_transfer=s.kv_transfer_port is not None,
        )
        for s in specs
    ]
    return engines, fleet


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# Below this many open files, the log says what it limits.
LOW_OPEN_FILE_LIMIT = 8192


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to its hard limit, for it
    and every process it starts (workers, local engines); returns the soft limit now (None
    where there are no such limits).

    Every stream holds two descriptors, the client's connection and the engine's. The soft
    limit hosts start services with is often 1024 (systemd, recent Docker) while the hard one
    allows far more: at 1024 the gateway carried about 500 streams, and past that uvloop
    closed every new client connection unanswered, with nothing in the log (bench.load)."""
    try:
        import resource
    except ImportError:  # not a POSIX host
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return None if soft == resource.RLIM_INFINITY else soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        else:
            logger.info("open-file limit raised from %d to %d", soft, hard)
            soft = hard
    if soft < LOW_OPEN_FILE_LIMIT:
        logger.warning("open-file limit %d: about %d concurrent streams at most (two descriptors each); past "
                       "it new connections are closed unanswered. Raise the hard limit (systemd LimitNOFILE=, "
                       "docker --ulimit nofile=N:N, ulimit -Hn)", soft, max(0, (soft - 64) // 2))  # fmt: skip
    return soft


def serve(config: GatewayConfig) -> None:
    raise_open_file_limit()
    fleet = None
    # Until uvicorn installs its own handlers, SIGTERM must unwind like Ctrl-C so the
    # engines started so far are stopped.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        if config.local_engines is not None:
            local, fleet = local_engine_configs(config.local_engines)
            updates: dict[str, object] = {"engines": local + config.engines}
            name = config.local_engines.served_model_name
            if not any(m.name == name for m in config.models):
                # The gateway tokenizes locally with the very files the engines load.
                updates["models"] = [*config.models, ModelConfig(name=name, tokenizer=config.local_engines.model_dir)]
            config = config.model_copy(update=updates)
        logger.info("gateway listening on http://%s:%d/v1 (%d worker%s)", config.server.host, config.server.port,
                    config.server.workers, "s" if config.server.workers > 1 else "")  # fmt: skip
        if config.server.workers > 1:
            run_workers(config)
        else:
            from gateway.app import build_app

            server = uvicorn.Server(uvicorn.Config(build_app(config, freeze_gc=True), **_server_options(config)))
            server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if fleet is not None:
            logger.info("stopping local engines")
            fleet.stop()  # type: ignore[attr-defined]


def _server_options(config: GatewayConfig) -> dict[str, Any]:
    return {"host": config.server.host, "port": config.server.port, "log_level": "info",
            "access_log": config.server.access_log, "timeout_graceful_shutdown": 10}  # fmt: skip


def run_workers(config: GatewayConfig) -> None:
    """`server.workers` processes on one socket (gateway.workers), until Ctrl-C or SIGTERM."""
    from gateway.workers import worker_environment

    with worker_environment(config):
        uvicorn.run("gateway.workers:create_app", factory=True, workers=config.server.workers,
                    **_server_options(config))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", default="configs/local.yaml", help="YAML configuration file")
    parser.add_argument("--port", type=int, help="override server.port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: one line per proxied request is the access
    # log's job, not the client library's.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.port is not None:
        config.server.port = args.port
    serve(config)
    return 0
