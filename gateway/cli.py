"""`python -m gateway --config configs/local.yaml`: run the gateway in the foreground.

With a `local_engines:` section, the gateway first builds the tiny test model (once), starts
that many CPU vLLM engines and puts them in front of any `engines:` listed; Ctrl-C or SIGTERM
stops the gateway and then the engines it started. Editing the file, or SIGHUP, reloads it
without a restart (gateway.reload).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from gateway.config import ConfigError, EngineConfig, GatewayConfig, LocalEnginesConfig
from gateway.config_file import ConfigFile
from gateway.limits.open_files import fit_to_open_files, raise_open_files_limit
from gateway.limits.protocol import limited_http_protocol
from gateway.listen import bind
from gateway.reload import ignore_hangup_until_serving

logger = logging.getLogger("gateway")

# The name of the store `local_engines.kv_store` starts (engines[].kv_store of its engines).
LOCAL_KV_STORE = "local"


def local_engine_configs(local: LocalEnginesConfig) -> tuple[list[EngineConfig], object]:
    """Build the model, start the engines; returns their configs and the running fleet."""
    from engine_adapter.launch.kv_store import KVStoreSpec
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
        kv_store_port=local.kv_store_port if local.kv_store else None,
    )
    store = None
    if local.kv_store:
        store = KVStoreSpec(LOCAL_KV_STORE, local.kv_store_port, local.kv_store_http_port, host=local.host,
                            l1_size_gib=local.kv_store_gib)  # fmt: skip
    fleet = EngineFleet(specs, local.log_dir, kv_store=store)
    logger.info("starting %d CPU vLLM engines (logs in %s); this takes about a minute", len(specs), local.log_dir)
    fleet.start(timeout_s=local.startup_timeout_s)
    engines = [
        EngineConfig(
            name=s.name,
            url=s.url,
            kv_events_endpoint=s.kv_events_endpoint,
            models=[s.served_model_name],
            kv_transfer=s.kv_transfer_port is not None,
            kv_store=LOCAL_KV_STORE if s.kv_store_port is not None else None,
        )
        for s in specs
    ]
    return engines, fleet


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(config: GatewayConfig, file: ConfigFile, digest: str) -> None:
    """Serve `config`, read from `file` (its text's digest: `digest`), which is followed."""
    fleet = None
    # Until uvicorn installs its own handlers, SIGTERM must unwind like Ctrl-C so the
    # engines started so far are stopped.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # SIGHUP reloads the configuration once the gateway serves (gateway.reload); before (the
    # engines starting) and after (the engines stopping), it must not kill the process.
    previous_hangup = signal.signal(signal.SIGHUP, ignore_hangup_until_serving)
    try:
        if config.local_engines is not None:
            local, fleet = local_engine_configs(config.local_engines)
            file = file.with_local_engines(local, config.local_engines)
            config = file.resolve(config)
        config = fit_to_host(config)
        logger.info("gateway listening on http://%s:%d/v1 (%d worker%s)", config.server.host, config.server.port,
                    config.server.workers, "s" if config.server.workers > 1 else "")  # fmt: skip
        if config.server.workers > 1:
            run_workers(config, file, digest)
        else:
            from gateway.app import build_app

            app = build_app(config, config_file=file, config_digest=digest, freeze_gc=True)
            uvicorn_config = uvicorn.Config(app, **server_options(config))
            uvicorn.Server(uvicorn_config).run(sockets=bind(uvicorn_config))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if fleet is not None:
            logger.info("stopping local engines")
            fleet.stop()  # type: ignore[attr-defined]
        signal.signal(signal.SIGHUP, previous_hangup)


def fit_to_host(config: GatewayConfig) -> GatewayConfig:
    """`config` with its connection caps fitted to the open-file limit, raised first to the
    hard limit (worker processes inherit it)."""
    limits = fit_to_open_files(config.limits, raise_open_files_limit(), len(config.engines))
    return config if limits is config.limits else config.model_copy(update={"limits": limits})


def server_options(config: GatewayConfig) -> dict[str, Any]:
    """uvicorn's options for `config`, one worker or several (tests use them too)."""
    limits = config.limits
    return {
        "host": config.server.host, "port": config.server.port, "log_level": "info",
        "access_log": config.server.access_log, "timeout_graceful_shutdown": 10,
        # httptools with the limits uvicorn lacks; keep-alive is uvicorn's own.
        "http": limited_http_protocol(limits), "timeout_keep_alive": limits.keep_alive_timeout_s,
        # The gateway serves no WebSocket: an Upgrade request is an ordinary HTTP request.
        "ws": "none",
    }  # fmt: skip


def run_workers(config: GatewayConfig, file: ConfigFile, digest: str) -> None:
    """`server.workers` processes on one socket (gateway.workers), until Ctrl-C or SIGTERM."""
    from gateway.workers import run_supervisor, worker_environment

    with worker_environment(config, file, digest):
        run_supervisor(uvicorn.Config("gateway.workers:create_app", factory=True, workers=config.server.workers,
                                      **server_options(config)))  # fmt: skip


def configure_logging() -> None:
    """The gateway's log lines, in this process and in each worker (gateway.workers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: one line per proxied request is the access
    # log's job, not the client library's.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", default="configs/local.yaml", help="YAML configuration file")
    parser.add_argument("--port", type=int, help="override server.port")
    args = parser.parse_args(argv)
    configure_logging()
    file = ConfigFile(path=args.config, port=args.port)
    try:
        # The policy is built once here too: an unknown one stops the start-up before any
        # engine is started for it, with the same one-line message as any bad field.
        config, digest = file.read()
        serve(config, file, digest)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0
