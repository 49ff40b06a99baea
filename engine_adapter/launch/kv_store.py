"""A shared KV store for local engines: one LMCache server in multiprocess mode.

Engines attached to it run vLLM's `LMCacheMPConnector` (`connector_config`): each writes the
KV of what it computes to the store, in 256-token chunks, and loads from it what any engine
wrote there. The store lives in host memory (its L1 tier, LRU beyond `l1_size_gib`).

Transfer mode: LMCache's default on CPU (`engine_driven`, through shared memory) moves a
2k-token prefix in a few milliseconds; in it, each engine announces (KV events, medium `CPU`,
block size 256) the chunks it wrote itself and nothing else. `lmcache_driven` would have every
engine announce every chunk and every eviction, but made a load slower than recomputing here.
`--kv-event-log-size 0` turns off the server's event channel the fast mode does not use.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_adapter.launch.process import answers_ok, log_tail, spawn_logged, stop_group

logger = logging.getLogger(__name__)

# No usage telemetry from LMCache or vLLM (and no network to send it to here).
NO_TELEMETRY_ENV = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1"}
# LMCache's store chunk (tokens); a multiple of every engine's block size.
CHUNK_SIZE_TOKENS = 256


class KVStoreLaunchError(RuntimeError):
    pass


def connector_config(host: str, port: int, transfer_mode: str | None = None) -> dict[str, Any]:
    """vLLM's `--kv-transfer-config` for an engine attached to the store at host:port;
    `transfer_mode` "lmcache_driven" for the slow mode that announces every store event."""
    extra: dict[str, Any] = {"lmcache.mp.host": f"tcp://{host}", "lmcache.mp.port": port}
    if transfer_mode is not None:
        extra["lmcache.mp.mp_transfer_mode"] = transfer_mode
    return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


@dataclass(frozen=True)
class KVStoreSpec:
    name: str
    port: int
    http_port: int
    host: str = "127.0.0.1"
    l1_size_gib: float = 1.0
    chunk_size_tokens: int = CHUNK_SIZE_TOKENS
    # The server's own event channel, used by the slow (lmcache_driven) transfer mode only.
    kv_event_log_size: int = 0

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/healthcheck"

    def command(self) -> list[str]:
        lmcache = Path(sys.executable).with_name("lmcache")
        return [
            str(lmcache), "server",
            "--host", self.host,
            "--port", str(self.port),
            "--http-host", self.host,
            "--http-port", str(self.http_port),
            "--chunk-size", str(self.chunk_size_tokens),
            "--l1-size-gb", f"{self.l1_size_gib:g}",
            "--eviction-policy", "LRU",
            "--supported-transfer-mode", "auto",
            # The engines' fast (engine-driven) transfers go through this shared-memory segment.
            "--shm-name", f"lmcache-{self.name}-{self.port}",
            "--kv-event-log-size", str(self.kv_event_log_size),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {**os.environ, **NO_TELEMETRY_ENV}


@dataclass
class LocalKVStore:
    spec: KVStoreSpec
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = spawn_logged(self.spec.command(), self.spec.environment(), self.log_path)
        logger.info("started KV store %s (pid %s) on %s:%d", self.spec.name, self.process.pid, self.spec.host,
                    self.spec.port)  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return answers_ok(self.spec.health_url)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if not self.running:
                raise KVStoreLaunchError(f"KV store {self.spec.name} exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise KVStoreLaunchError(f"KV store {self.spec.name} not ready after {timeout_s:.0f}s")
            time.sleep(0.25)

    def log_tail(self, num_lines: int = 30) -> str:
        return log_tail(self.log_path, num_lines)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the store's process group, SIGKILL what is left after `timeout_s`."""
        if self.process is None:
            return
        proc, self.process = self.process, None
        stop_group(proc, timeout_s, f"KV store {self.spec.name}")
