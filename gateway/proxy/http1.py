"""A lean HTTP/1.1 client for the engines: one request at a time on each pooled keep-alive
connection, the response body handed over as it arrives.

Why not a general client: aiohttp's request path (a ClientRequest, a ClientResponse, header
multidicts, a timer and a task per request) took ~13 % of the gateway's CPU per request
(bench.overhead, 2k-token chats at 450 req/s, py-spy --gil), more than routing did. Engines
speak plain HTTP/1.1; the gateway sends a body it holds whole and reads one response. Here a
request is one write of bytes built from the headers, and the response is parsed by
httptools (llhttp, the parser uvicorn runs) straight from the socket's callbacks.

Errors are this module's own (`Http1Error` and its kinds): gateway.proxy.upstream maps them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

# An idle connection is reused for this long at most: under the 5 s after which vLLM's server
# (uvicorn's keep-alive default) closes it, so a request is rarely sent on a connection the
# engine is closing at that moment (it would fail as `ClosedEarly`).
IDLE_S = 4.0
# Body bytes held for a reader that does not keep up (a slow client) before the socket is
# paused: the engine then waits on TCP, not the gateway's memory.
MAX_BUFFERED_BYTES = 256 * 1024


class Http1Error(Exception):
    """The request failed; the kinds below say how far it got."""


class ConnectFailed(Http1Error):
    """No connection: nothing reached the server."""


class ConnectTimedOut(ConnectFailed):
    pass


class ClosedEarly(Http1Error):
    """The server closed the connection before the first byte of its response."""


class ReadTimedOut(Http1Error):
    """The server sent nothing for `read_timeout_s`."""


class ResponseBroken(Http1Error):
    """A malformed response, or the connection dropped in the middle of one."""


class RequestInvalid(Http1Error):
    """Headers that cannot be sent as they are (a line break in a value, non-Latin-1 text)."""


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool
    # What requests start with: the URL's path (an engine behind a path prefix), and the
    # Host header.
    base_path: str
    host_header: str


def origin_of(url: str) -> Origin:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rpartition("@")[2]
    return Origin(parts.hostname, port, tls, parts.path.rstrip("/"), host_header)


class Http1Response:
    """A response whose status and headers arrived; its body is read with `aiter_raw`."""

    def __init__(self, connection: _Connection, read_timeout_s: float, head_only: bool) -> None:
        self._connection = connection
        self._read_timeout_s = read_timeout_s
        self._head_only = head_only
        self.status_code = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._num_buffered_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: Http1Error | None = None
        self._got_bytes = False
        self._has_headers = False
        self._complete = False
        self._keep_alive = False
        self._closed = False

    def header(self, name: str) -> str:
        """The first value of header `name` (lower case), or ""."""
        wanted = name.encode("latin-1")
        for key, value in self.raw_headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return ""

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded from chunked transfer coding). Chunks received
        before a failure are yielded first, then the `Http1Error` raised."""
        chunks = self._chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                self._num_buffered_bytes -= len(chunk)
                if self._paused and self._num_buffered_bytes <= MAX_BUFFERED_BYTES // 2:
                    self._paused = False
                    self._connection.resume_reading()
                yield chunk
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    async def aclose(self) -> None:
        """Done with it: the connection goes back to the pool when the response was read to
        its end, and is closed otherwise (the server sees the disconnect: vLLM aborts)."""
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if self._complete and self._keep_alive and not self._chunks and not connection.closed:
            connection.release()
        else:
            connection.close()

    # -- waiting ---------------------------------------------------------------------------

    async def read_head(self) -> None:
        while not self._has_headers:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout_s, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self.fail(ReadTimedOut(f"nothing received in {self._read_timeout_s:g} s"))
        self._connection.close()

    # -- from the connection ---------------------------------------------------------------

    def fail(self, error: Http1Error) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    def on_bytes(self) -> None:
        self._got_bytes = True

    def on_head(self, status_code: int, keep_alive: bool) -> None:
        self.status_code = status_code
        self._keep_alive = keep_alive and not self._head_only
        self._has_headers = True
        if self._head_only:
            self._complete = True  # llhttp cannot know a HEAD response has no body
        self._wake()

    def on_body(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._num_buffered_bytes += len(chunk)
        if self._num_buffered_bytes > MAX_BUFFERED_BYTES and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def on_complete(self) -> None:
        self._complete = True
        self._wake()

    def on_lost(self) -> None:
        if self._complete:
            return
        if self._has_headers and self._body_until_eof():
            self.on_complete()
        elif not self._got_bytes:
            self.fail(ClosedEarly("the server closed the connection before answering"))
        else:
            self.fail(ResponseBroken("the connection closed in the middle of the response"))

    def _body_until_eof(self) -> bool:
        """A body without a length: it ends when the connection does (HTTP/1.1 allows it)."""
        framed = any(key.lower() in (b"content-length", b"transfer-encoding") for key, _ in self.raw_headers)
        return not framed and self.status_code not in (204, 304)


class _Connection(asyncio.Protocol):
    """One socket to a server, its response parser, and the response it is reading (if any)."""

    def __init__(self, pool: Http1Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: Http1Response | None = None
        self.closed = False
        self.idle_since = 0.0

    def send(self, data: bytes, response: Http1Response) -> None:
        assert self._transport is not None
        if self.closed or self._transport.is_closing():
            raise ClosedEarly("the connection closed before the request was sent")
        self._response = response
        self._transport.write(data)

    def release(self) -> None:
        self._response = None
        self._pool.give_back(self)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        response.on_bytes()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response.fail(ResponseBroken(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self._response = self._response, None
        if response is not None:
            response.on_lost()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._response is None:  # a second response to one request: the connection is not trusted
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None:
            return
        status_code = self._parser.get_status_code()
        if status_code < 200:  # an interim response (100 Continue): the real one follows
            response.raw_headers.clear()
            return
        response.on_head(status_code, self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.on_body(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and response.status_code >= 200:
            self._response = None  # what follows on this connection answers the next request
            response.on_complete()


class Http1Pool:
    """Keep-alive connections per origin, most recently used first."""

    def __init__(self) -> None:
        self._origins: dict[str, Origin] = {}
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self, url: str, method: str, path: str, headers: Mapping[str, str], body: bytes, *,
        connect_timeout_s: float, read_timeout_s: float,
    ) -> Http1Response:  # fmt: skip
        """Send the request to `url` (a base URL) + `path`; return once the response's status
        and headers arrived. The caller passes neither Host nor Content-Length: they are set
        here. Raises an `Http1Error`."""
        origin = self._origins.get(url) or self._origin(url)
        data = _request_bytes(method, origin, path, headers, body)
        connection = self._take(origin) or await self._connect(origin, connect_timeout_s)
        response = Http1Response(connection, read_timeout_s, head_only=method == "HEAD")
        connection.send(data, response)
        try:
            await response.read_head()
        except BaseException:  # failed, timed out, or cancelled (the client left)
            connection.close()
            raise
        return response

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def give_back(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
            return
        now = time.monotonic()
        connection.idle_since = now
        idle = self._idle.get(connection.origin)
        if idle is None:
            idle = self._idle[connection.origin] = deque()
        idle.append(connection)
        _close_stale(idle, now)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_S, self._close_stale)

    def _close_stale(self) -> None:
        """Idle connections past `IDLE_S` are closed (their sockets freed) within another
        `IDLE_S`, also when no request comes to find them stale."""
        now = time.monotonic()
        for origin, idle in list(self._idle.items()):
            _close_stale(idle, now)
            if not idle:
                del self._idle[origin]
        self._sweep = asyncio.get_running_loop().call_later(IDLE_S, self._close_stale) if self._idle else None

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since <= IDLE_S:
                return connection
            connection.close()
        return None

    def _origin(self, url: str) -> Origin:
        try:
            origin = origin_of(url)
        except ValueError as exc:
            raise RequestInvalid(str(exc)) from None
        self._origins[url] = origin
        return origin

    async def _connect(self, origin: Origin, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port, ssl=tls,
                )  # fmt: skip
        except TimeoutError:
            raise ConnectTimedOut(f"no connection to {origin.host}:{origin.port} in {timeout_s:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        return connection


def _close_stale(idle: deque[_Connection], now: float) -> None:
    while idle and (idle[0].closed or now - idle[0].idle_since > IDLE_S):  # the longest idle, at the left
        idle.popleft().close()


def _request_bytes(method: str, origin: Origin, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [f"{method} {origin.base_path}{path} HTTP/1.1", f"host: {origin.host_header}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"content-length: {len(body)}")
    head = "\r\n".join(lines)
    # Each line break is one this function put there: a value with its own would smuggle a
    # header (or a request) in.
    if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
        raise RequestInvalid("a header name or value, or the path, holds a line break")
    try:
        return b"".join((head.encode("latin-1"), b"\r\n\r\n", body))
    except UnicodeEncodeError:
        raise RequestInvalid("a header name or value, or the path, is not Latin-1 text") from None
