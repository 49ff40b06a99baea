"""The load generator's HTTP client: keep-alive HTTP/1.1 with a cap on open connections and a
total time limit per request, outcomes as short strings ("200", "503", "timeout", "conn").

Why not aiohttp (which `bench.overhead` used before): on a two-core machine the load generator
shares a core with the fake engines and, with two gateway workers, with the router it measures,
so every microsecond it spends is taken from what it measures. Measured side by side, 2,000
req/s of 2k-token chats straight to two fake engines for 2.5 s: aiohttp used 0.21 ms of the
client process's CPU per request, this client 0.105 ms (most of it now the kernel's and
uvloop's), and the median latency it saw fell from 0.44 to 0.23 ms. The connections are the
gateway's own lean pool (`gateway.proxy.http1`: one write per request, the answer parsed by
llhttp from the socket's callbacks), so it speaks what the gateway speaks to its engines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

from gateway.proxy.http1 import ConnectTimedOut, Http1Error, Http1Pool, ReadTimedOut

JSON_HEADERS: Mapping[str, str] = {"content-type": "application/json"}
NO_HEADERS: Mapping[str, str] = {}


class Client:
    """`max_connections` open at most; a request beyond them waits for one (the wait counts in
    its latency and its time limit, as a real client's would)."""

    def __init__(self, max_connections: int = 512) -> None:
        self._pool = Http1Pool()
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self._pool.close()

    async def post(self, url: str, path: str, body: bytes, timeout_s: float) -> tuple[str, float]:
        """(outcome, seconds) of a JSON POST to base `url` + `path`, the answer read whole."""
        return await self._send("POST", url, path, JSON_HEADERS, body, timeout_s)

    async def get(self, url: str, path: str, timeout_s: float) -> tuple[str, float]:
        return await self._send("GET", url, path, NO_HEADERS, b"", timeout_s)

    async def open_connections(self, urls: Sequence[str], num_per_url: int, path: str = "/health") -> None:
        """Open about `num_per_url` pooled connections to each base URL (as many GETs at once)."""
        await asyncio.gather(*(self.get(url, path, 5.0) for url in urls for _ in range(num_per_url)))

    async def _send(self, method: str, url: str, path: str, headers: Mapping[str, str], body: bytes,
                    timeout_s: float) -> tuple[str, float]:  # fmt: skip
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                response = await self._pool.request(url, method, path, headers, body,
                                                    connect_timeout_s=timeout_s, read_timeout_s=timeout_s)  # fmt: skip
                try:
                    async for _ in response.aiter_raw():
                        pass
                finally:
                    await response.aclose()
        except (TimeoutError, ReadTimedOut, ConnectTimedOut):
            return "timeout", time.perf_counter() - start
        except Http1Error:  # refused, closed before or during the answer, malformed
            return "conn", time.perf_counter() - start
        return str(response.status_code), time.perf_counter() - start
