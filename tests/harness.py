"""Test helpers: free ports, and a real gateway (uvicorn) running in a background thread."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn
import yaml

from bench.fake_engine import FakeEngine, HTTPProtocol
from engine_adapter.launch.launcher import EngineFleet
from gateway.app import build_app
from gateway.cli import fit_to_host, server_options
from gateway.config import GatewayConfig, parse_config
from gateway.listen import bind


_handed_out: set[int] = set()


def free_port() -> int:
    """A port to listen on, free now, never handed out before in this run, and outside the
    kernel's ephemeral range: a port the OS picks (bind to 0) is also a candidate for the
    source port of the next outgoing connection, which then takes it before the engine that
    was given it binds it (seen here: an engine's KV-event socket failed with EADDRINUSE)."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(10_000, low) if low > 11_000 else _os_port()
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


def _os_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class GatewayServer:
    """The real app behind a real HTTP server, so the OpenAI SDK talks to it over TCP: uvicorn
    with the options `python -m gateway` gives it (gateway.cli), in a thread of this process.
    `transport` replaces the network to the engines (fake engines, tests/unit/fake_engines.py)."""

    def __init__(self, config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.port = free_port()
        self.config = fit_to_host(config)
        self.app = build_app(self.config, transport=transport)
        options = {**server_options(self.config), "host": "127.0.0.1", "port": self.port, "log_level": "warning"}
        uvicorn_config = uvicorn.Config(self.app, lifespan="on", **options)
        self._server = uvicorn.Server(uvicorn_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": bind(uvicorn_config)},
                                        name=f"gateway-{self.port}", daemon=True)  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def fake_engine_in_thread(fake: FakeEngine) -> Iterator[str]:
    """The benchmark's fake engine (bench/fake_engine.py) on a loopback port, in a thread of this
    process; its base URL. A real HTTP server, for gateways in another process."""
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = loop.run_until_complete(loop.create_server(lambda: HTTPProtocol(fake), sock=sock))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=2)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def gateway_config(engines: list[dict[str, Any]], **sections: Any) -> GatewayConfig:
    return parse_config({"engines": engines, **sections}, "test")


def stop_process_group(process: subprocess.Popen[bytes], term_wait_s: float = 20.0) -> None:
    """SIGTERM the process's group and wait; then SIGKILL whatever of the group is left
    (children that outlive their parent, as vLLM's engine core can)."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from `url`/metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    # Generous: on a starved machine (engines decoding on both cores) an answer the gateway
    # gives at once has been seen to take over 5 s (httpx's default) to arrive.
    text = httpx.get(f"{url}/metrics", timeout=60).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class GatewayProcess:
    """`python -m gateway --config FILE`, as users run it (several workers included)."""

    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.port = free_port()
        self.config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": self.port}}
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._config_file: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the file the gateway runs from (listening where it does), in one step, as
        an operator's deployment tool would (a rename: never a half-written file)."""
        assert self._config_file is not None
        self.config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": self.port}}
        staged = self._config_file.with_suffix(".staged")
        staged.write_text(yaml.safe_dump(self.config))
        os.replace(staged, self._config_file)

    def write_text(self, text: str) -> None:
        """The file's content as it is (an invalid file, say), replaced in one step."""
        assert self._config_file is not None
        staged = self._config_file.with_suffix(".staged")
        staged.write_text(text)
        os.replace(staged, self._config_file)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def send_signal(self, sig: int) -> None:
        assert self._process is not None
        self._process.send_signal(sig)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 60.0) -> GatewayProcess:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(handle, "w") as out:
            yaml.safe_dump(self.config, out)
        self._config_file = Path(name)
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", name], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self._log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process)
            self._process = None
        if self._config_file is not None:
            self._config_file.unlink(missing_ok=True)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def engine_core(fleet: EngineFleet, name: str) -> psutil.Process:
    """vLLM's engine-core process of engine `name` (the API server is its parent)."""
    process = fleet.by_name(name).process
    assert process is not None
    for child in psutil.Process(process.pid).children(recursive=True):
        if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
            return child
    raise AssertionError(f"engine {name} has no EngineCore process")


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) for the block's duration, resumed whatever happens
    (unless the block killed them)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
