"""The listening socket, polled as several (gateway.listen): on uvloop, the gateway's loop, a
crowd of clients that connected while the loop was busy is accepted in a pass or two, not one
connection per pass."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest
import uvloop

from bench.fake_engine import FakeEngine
from gateway.listen import ACCEPTS_PER_PASS, listening_sockets
from tests.harness import GatewayProcess, fake_engine_in_thread

NUM_CLIENTS = 48


class _Counted(asyncio.Protocol):
    def __init__(self, made_in_pass: list[int], passes: list[int]) -> None:
        self._made_in_pass = made_in_pass
        self._passes = passes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made_in_pass.append(self._passes[0])


async def _passes_to_accept(accepts_per_pass: int) -> list[int]:
    """Open `NUM_CLIENTS` connections while the loop is busy; the loop pass in which each was
    accepted, counted from the first pass after the busy one."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=NUM_CLIENTS * 2)
    listener.setblocking(False)
    made_in_pass: list[int] = []
    passes = [0]
    sockets = listening_sockets(listener, accepts_per_pass)
    servers = [await loop.create_server(lambda: _Counted(made_in_pass, passes), sock=s) for s in sockets]
    clients: list[socket.socket] = []

    def busy_pass() -> None:
        # The kernel completes each handshake and queues the connection; nothing of it is
        # accepted while this callback holds the loop.
        clients.extend(socket.create_connection(listener.getsockname()) for _ in range(NUM_CLIENTS))
        passes[0] = 0
        loop.call_soon(count_pass)

    def count_pass() -> None:  # runs once per pass of the loop
        passes[0] += 1
        if len(made_in_pass) < NUM_CLIENTS and passes[0] < 10 * NUM_CLIENTS:
            loop.call_soon(count_pass)

    try:
        loop.call_soon(busy_pass)
        deadline = time.monotonic() + 10
        while len(made_in_pass) < NUM_CLIENTS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return made_in_pass
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.close()
        for s in sockets:
            s.close()


def test_a_crowd_that_connected_during_a_busy_pass_is_accepted_in_a_few_passes() -> None:
    made_in_pass = uvloop.run(_passes_to_accept(16))
    assert len(made_in_pass) == NUM_CLIENTS
    # 16 per pass: 48 connections in 3 passes (a fourth if one pass caught the kernel queue
    # before the last handshakes completed).
    assert max(made_in_pass) - min(made_in_pass) <= 3, made_in_pass


def test_one_descriptor_accepts_one_connection_per_pass() -> None:
    """Why: libuv (1.45+) accepts a single connection per pass of the loop."""
    made_in_pass = uvloop.run(_passes_to_accept(1))
    assert len(made_in_pass) == NUM_CLIENTS
    assert max(made_in_pass) - min(made_in_pass) >= NUM_CLIENTS - 1, made_in_pass


def _listening_descriptors(process: psutil.Process, port: int) -> int:
    """Descriptors `process` holds of the socket listening on `port` (its duplicates included:
    they share one inode)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{process.pid}/fd")
    return sum(1 for fd in fds.iterdir() if _readlink(fd) in inodes)


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:  # closed meanwhile
        return ""


@pytest.mark.parametrize("num_workers", [1, 2])
def test_python_m_gateway_listens_through_16_descriptors_in_each_worker(tmp_path: Path, num_workers: int) -> None:
    with fake_engine_in_thread(FakeEngine("m", "/models/m")) as engine_url:
        config = {"engines": [{"name": "a", "url": engine_url}], "server": {"workers": num_workers},
                  "routing": {"policy": "round_robin"}, "health": {"interval_s": 600}}  # fmt: skip
        with GatewayProcess(config, tmp_path / "gateway.log") as gateway:
            parent = psutil.Process(gateway.pid)
            processes = [parent] if num_workers == 1 else parent.children()
            serving = [p for p in processes if _listening_descriptors(p, gateway.port)]
            assert len(serving) == num_workers
            assert [_listening_descriptors(p, gateway.port) for p in serving] == [ACCEPTS_PER_PASS] * num_workers
            assert httpx.get(f"{gateway.url}/v1/models").status_code == 200
