"""Launch local CPU vLLM engines, wait until they serve, and stop exactly what we started.

Each engine runs in its own process group (so its EngineCore/worker children go with it),
logs to its own file, and binds its OpenMP threads to its own core: with two engines on a
two-core machine, vLLM's auto-binding would otherwise put both on the same core.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_adapter.launch.kv_store import NO_TELEMETRY_ENV, KVStoreSpec, LocalKVStore, connector_config
from engine_adapter.launch.process import (answers_ok, kill_group, log_tail, shared_memory_of_group, signal_group,
                                           spawn_logged, stop_group)

logger = logging.getLogger(__name__)


class EngineLaunchError(RuntimeError):
    pass


# KV transfer between CPU engines (design.md §5): vLLM's NIXL connector, loaded through our
# module that makes NIXL's progress thread sleep between polls instead of spinning on a core
# (engine_adapter/transfer/vllm_nixl.py), KV buffers in host memory.
NIXL_TRANSFER_CONFIG = {
    "kv_connector": "NixlConnector",
    "kv_connector_module_path": "engine_adapter.transfer.vllm_nixl",
    "kv_role": "kv_both",
    "kv_buffer_device": "cpu",
    # One UCX worker thread, not vLLM's default four: two cores cannot spare them.
    "kv_connector_extra_config": {"num_threads": 1},
}
# UCX between processes on one host: cross-memory attach for the data, TCP for the handshake.
NIXL_CPU_ENV = {"UCX_TLS": "cma,tcp,self"}


@dataclass(frozen=True)
class EngineSpec:
    name: str
    model_dir: str
    served_model_name: str
    port: int
    host: str = "127.0.0.1"
    kv_events_port: int | None = None
    block_size: int = 32
    kv_cache_gib: float = 1.0
    max_model_len: int = 16384
    cpu_bind: str | None = None  # e.g. "0" or "0-1"; None lets vLLM decide
    num_gpu_blocks_override: int | None = None
    # NIXL side-channel port: set, the engine can hand its cached KV to other engines and
    # take theirs (engine_adapter.transfer); each engine on a host needs its own.
    kv_transfer_port: int | None = None
    # Port of the shared KV store (an LMCache server on `host`, engine_adapter.launch.kv_store):
    # set, the engine runs vLLM's LMCacheMPConnector to it; with `kv_transfer_port` too, both
    # connectors run in one vLLM MultiConnector (NIXL first, so a pull is NIXL's, any other
    # load the store's).
    kv_store_port: int | None = None
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()

    @property
    def confine_to_cores(self) -> bool:
        """Engines with NIXL run wholly on their own cores: after it serves a request, an
        engine with the connector keeps its (unpinned) engine-core process busy for a while,
        and on a neighbour's core that slowed the neighbour's next request by ~400 ms here."""
        return self.kv_transfer_port is not None and bool(self.cpu_bind)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        return None if self.kv_events_port is None else f"tcp://{self.host}:{self.kv_events_port}"

    def command(self) -> list[str]:
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--block-size", str(self.block_size),
            "--max-model-len", str(self.max_model_len),
            "--enable-prompt-tokens-details",
            # Exposes /v1/*/render, which tests use to prove our tokenization matches the engine's.
            "--enable-scale-out",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.kv_events_port is not None:
            events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://*:{self.kv_events_port}",
                "topic": "kv-events",
            }
            args += ["--kv-events-config", json.dumps(events)]
        if self.num_gpu_blocks_override is not None:
            args += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        connector = self.kv_transfer_config()
        if connector is not None:
            args += ["--kv-transfer-config", json.dumps(connector)]
        return args + list(self.extra_args)

    def kv_transfer_config(self) -> dict[str, Any] | None:
        """vLLM's `--kv-transfer-config`: NIXL, the store's LMCacheMPConnector, both in a
        MultiConnector, or none."""
        connectors = []
        if self.kv_transfer_port is not None:
            connectors.append(NIXL_TRANSFER_CONFIG)
        if self.kv_store_port is not None:
            connectors.append(connector_config(self.host, self.kv_store_port))
        if len(connectors) < 2:
            return connectors[0] if connectors else None
        return {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
                "kv_connector_extra_config": {"connectors": connectors}}  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # vLLM's CPU backend wants whole GiB here.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.kv_cache_gib)))
        if self.cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if self.kv_transfer_port is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = self.host
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.kv_transfer_port)
            env.update(NIXL_CPU_ENV)
        if self.kv_store_port is not None:
            env.update(NO_TELEMETRY_ENV)
        env.update(dict(self.extra_env))
        return env


@dataclass
class LocalEngine:
    spec: EngineSpec
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = spawn_logged(self.spec.command(), self.spec.environment(), self.log_path,
                                    self._confine if self.spec.confine_to_cores else None)  # fmt: skip
        logger.info("started engine %s (pid %s) on %s", self.spec.name, self.process.pid, self.spec.url)

    def _confine(self) -> None:
        """In the child before exec: the whole engine (API server, engine core, workers) on
        its own cores, inherited by everything it starts."""
        os.sched_setaffinity(0, parse_cpu_list(self.spec.cpu_bind or ""))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return answers_ok(f"{self.spec.url}/health")

    def log_tail(self, num_lines: int = 30) -> str:
        return log_tail(self.log_path, num_lines)

    def stop(self, timeout_s: float = 20.0, shared: set[str] | None = None) -> None:
        """SIGTERM the engine's process group, then SIGKILL what is left after `timeout_s`
        (`shared`: its shared memory, read before a SIGTERM sent already)."""
        if self.process is None:
            return
        proc, self.process = self.process, None
        stop_group(proc, timeout_s, f"engine {self.spec.name}", shared)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL the whole group at once."""
        if self.process is not None:
            kill_group(self.process, f"engine {self.spec.name}")


def parse_cpu_list(text: str) -> set[int]:
    """"0", "0-3", "0,2-3" -> the core numbers."""
    cores: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            first, last = part.split("-", 1)
            cores.update(range(int(first), int(last) + 1))
        elif part.strip():
            cores.add(int(part))
    return cores




def wait_ready(engines: Sequence[LocalEngine], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(engines)
    while pending:
        for engine in list(pending):
            if not engine.running:
                raise EngineLaunchError(f"engine {engine.spec.name} exited during start-up:\n{engine.log_tail()}")
            if engine.is_ready():
                pending.remove(engine)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(e.spec.name for e in pending)
            raise EngineLaunchError(f"engines not ready after {timeout_s:.0f}s: {names}\n{pending[0].log_tail()}")
        time.sleep(0.5)


class EngineFleet:
    """Start several engines together (they compile concurrently) and stop them all; with
    `kv_store`, the shared KV store the engines attach to is started first and stopped last."""

    def __init__(self, specs: Sequence[EngineSpec], log_dir: str | Path, kv_store: KVStoreSpec | None = None) -> None:
        self.engines = [LocalEngine(s, Path(log_dir) / f"{s.name}.log") for s in specs]
        self.kv_store = None if kv_store is None else LocalKVStore(kv_store, Path(log_dir) / f"{kv_store.name}.log")

    def start(self, timeout_s: float = 300.0) -> None:
        try:
            if self.kv_store is not None:
                self.kv_store.start()
                self.kv_store.wait_ready(timeout_s)
            for engine in self.engines:
                engine.start()
            wait_ready(self.engines, timeout_s)
        except BaseException:
            self.stop()
            raise

    def restart(self, name: str, timeout_s: float = 300.0) -> LocalEngine:
        engine = self.by_name(name)
        engine.stop()
        engine.start()
        wait_ready([engine], timeout_s)
        return engine

    def by_name(self, name: str) -> LocalEngine:
        for engine in self.engines:
            if engine.spec.name == name:
                return engine
        raise KeyError(name)

    def stop(self) -> None:
        # All at once: read what each maps first (the later ones may be gone when their turn comes).
        shared = {id(e): shared_memory_of_group(e.process.pid) for e in self.engines if e.process is not None}
        for engine in self.engines:
            if engine.process is not None and engine.process.poll() is None:
                signal_group(engine.process.pid, signal.SIGTERM)
        for engine in self.engines:
            engine.stop(shared=shared.get(id(engine)))
        if self.kv_store is not None:
            self.kv_store.stop()

    def __enter__(self) -> EngineFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_specs(
    count: int,
    *,
    model_dir: str,
    served_model_name: str,
    host: str = "127.0.0.1",
    base_port: int = 8100,
    kv_events_base_port: int | None = 5557,
    block_size: int = 32,
    kv_cache_gib: float = 1.0,
    max_model_len: int = 16384,
    extra_args: Sequence[str] = (),
    num_gpu_blocks_override: int | None = None,
    kv_transfer_base_port: int | None = None,
    kv_store_port: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> list[EngineSpec]:
    """Specs for `count` engines on consecutive ports, each pinned to its own core."""
    num_cpus = os.cpu_count() or 1
    return [
        EngineSpec(
            name=f"engine-{i}",
            model_dir=model_dir,
            served_model_name=served_model_name,
            host=host,
            port=base_port + i,
            kv_events_port=None if kv_events_base_port is None else kv_events_base_port + i,
            block_size=block_size,
            kv_cache_gib=kv_cache_gib,
            max_model_len=max_model_len,
            cpu_bind=str(i % num_cpus),
            num_gpu_blocks_override=num_gpu_blocks_override,
            kv_transfer_port=None if kv_transfer_base_port is None else kv_transfer_base_port + i,
            kv_store_port=kv_store_port,
            extra_args=tuple(extra_args),
            extra_env=tuple((extra_env or {}).items()),
        )
        for i in range(count)
    ]
