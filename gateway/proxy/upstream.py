"""The upstream HTTP client: opens a streamed request to one engine and maps the client
library's errors onto the gateway's error tree. This is the only module that catches them.

Three implementations of one small protocol, chosen by `build_client` (`proxy.upstream_client`):
- `Http1Upstream`, the default: the gateway's own HTTP/1.1 client (gateway.proxy.http1), a
  request one write and the response parsed by httptools as it arrives. Per request it costs
  a fraction of aiohttp's (measured in its module's docstring).
- `AiohttpUpstream`: aiohttp's client, for what the lean one does not do (it is a general
  client: proxies aside, the same behaviour).
- `HttpxUpstream`, for an injected httpx transport: unit tests drive the whole app against
  fake engines through `httpx.MockTransport`. (httpx is not used for engines: httpcore polled
  every pooled idle connection on each request, a third of the gateway's CPU per request.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx

from gateway.config import ProxyConfig
from gateway.endpoints.registry import Endpoint
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.proxy import http1

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the HTTP stacks recompute for each hop.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip
# Only end-to-end headers reach the engines: never the client's credentials (for the gateway;
# engines have their own key), nor what a client could forge about where it comes from.
_NOT_FORWARDED = HOP_BY_HOP | {
    "authorization", "x-api-key", "cookie", "content-type", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "x-real-ip",
}  # fmt: skip
# The gateway's own server adds these; forwarding the engine's would duplicate them.
_SERVER_SET = frozenset({"date", "server"})
_NOT_RETURNED = (HOP_BY_HOP - {"content-length"}) | _SERVER_SET


class UpstreamResponse(Protocol):
    """An engine's response whose headers arrived and whose body is not read yet."""

    @property
    def status_code(self) -> int: ...

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]: ...

    def header(self, name: str) -> str:
        """The (first) value of header `name` (lower case), or ""."""
        ...

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as the engine sent it, chunk by chunk; UpstreamError if it fails."""
        ...

    async def aclose(self) -> None:
        """Done with it; unread, the connection is closed (the engine aborts the request)."""
        ...


class UpstreamClient(Protocol):
    async def open(
        self, endpoint: Endpoint, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        """Send the request; return once the response headers arrived.

        Raises UpstreamConnectError when nothing reached the engine (safe to retry elsewhere),
        UpstreamTimeout when the engine did not answer in time, UpstreamError otherwise."""
        ...

    def with_config(self, config: ProxyConfig) -> UpstreamClient:
        """A client with `config`'s timeouts on this one's connections (a reload): requests
        it opens use them, those already open keep theirs. Closing it closes both."""
        ...

    async def aclose(self) -> None: ...


def build_client(config: ProxyConfig, transport: httpx.AsyncBaseTransport | None = None) -> UpstreamClient:
    if transport is not None:
        return HttpxUpstream(config, transport)
    if config.upstream_client == "aiohttp":
        return AiohttpUpstream(config)
    return Http1Upstream(config)


async def open_stream(
    client: UpstreamClient,
    endpoint: Endpoint,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str = "POST",
) -> UpstreamResponse:
    """`path` may carry a query string. Errors as `UpstreamClient.open`."""
    return await client.open(endpoint, method, path, headers, body)


def upstream_headers(incoming: Mapping[str, str], endpoint: Endpoint, request_id: str) -> dict[str, str]:
    # Headers the client named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    named = {h.strip().lower() for h in incoming.get("connection", "").split(",")}
    headers = {k: v for k, v in incoming.items() if k.lower() not in _NOT_FORWARDED and k.lower() not in named}
    headers["x-request-id"] = request_id
    # The gateway parsed the body as JSON whatever the client declared.
    headers["content-type"] = "application/json"
    if endpoint.api_key:
        headers["authorization"] = f"Bearer {endpoint.api_key}"
    return headers


def response_headers(upstream: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """Raw headers for the client. Content-Length is kept: the body passes through unchanged."""
    return [(k, v) for k, v in upstream.raw_headers if k.decode("latin-1").lower() not in _NOT_RETURNED]


class BufferedResponse:
    """A response whose (small) body was read already: replayed as it came."""

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self._status_code = status_code
        self._raw_headers = raw_headers
        self.content = content

    @property
    def status_code(self) -> int:
        return self._status_code

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._raw_headers

    def header(self, name: str) -> str:
        return _find_header(self._raw_headers, name)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self.content:
            yield self.content

    async def aclose(self) -> None:
        return None


async def read_small(response: UpstreamResponse, endpoint: Endpoint, limit: int = 4096) -> BufferedResponse | None:
    """When `response`'s body is small (a Content-Length up to `limit`), read it and close the
    original: a `BufferedResponse` replays it. Otherwise None, `response` untouched."""
    length = response.header("content-length")
    if not length.isdigit() or int(length) > limit:
        return None
    try:
        content = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return BufferedResponse(response.status_code, response.raw_headers, content)


class PrefetchedResponse:
    """A response whose first body chunk was read already (to know the engine is answering
    before committing the client to it): that chunk is replayed first, then the rest as it
    comes. Made by `prefetch_first_chunk`."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response
        self._rest = response.aiter_raw()
        self._first_chunk: bytes | None = None

    async def read_first_chunk(self) -> None:
        try:
            self._first_chunk = await anext(self._rest)
        except StopAsyncIteration:
            self._first_chunk = None  # an empty body

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._response.raw_headers

    def header(self, name: str) -> str:
        return self._response.header(name)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._first_chunk is None:
            return
        yield self._first_chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


async def prefetch_first_chunk(response: UpstreamResponse) -> PrefetchedResponse:
    """`response` once its first body chunk arrived. Errors as `aiter_raw`."""
    prefetched = PrefetchedResponse(response)
    await prefetched.read_first_chunk()
    return prefetched


def _find_header(raw: list[tuple[bytes, bytes]], name: str) -> str:
    wanted = name.encode("latin-1")
    for key, value in raw:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return ""


# -- the gateway's own HTTP/1.1 client -----------------------------------------------------


class Http1Upstream:
    def __init__(self, config: ProxyConfig, pool: http1.Http1Pool | None = None) -> None:
        self._pool = pool or http1.Http1Pool()
        self._connect_timeout_s = config.connect_timeout_s
        self._read_timeout_s = config.read_timeout_s

    def with_config(self, config: ProxyConfig) -> Http1Upstream:
        return Http1Upstream(config, self._pool)

    async def open(
        self, endpoint: Endpoint, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        try:
            response = await self._pool.request(
                endpoint.url, method, path, headers, body,
                connect_timeout_s=self._connect_timeout_s, read_timeout_s=self._read_timeout_s,
            )  # fmt: skip
        except http1.ConnectTimedOut as exc:
            raise UpstreamConnectError(f"engine {endpoint.id} did not accept the connection in time") from exc
        except http1.ConnectFailed as exc:
            raise UpstreamConnectError(f"engine {endpoint.id} unreachable: {exc}") from exc
        except http1.ReadTimedOut as exc:
            raise UpstreamTimeout(f"engine {endpoint.id} did not answer in time") from exc
        except http1.ClosedEarly as exc:
            # The connection dropped before a response: nothing was sent to the client yet.
            raise UpstreamConnectError(f"engine {endpoint.id} closed the connection: {exc}") from exc
        except http1.Http1Error as exc:
            raise UpstreamError(f"engine {endpoint.id} failed: {type(exc).__name__}: {exc}") from exc
        return _Http1Response(response, endpoint)

    async def aclose(self) -> None:
        await self._pool.close()


class _Http1Response:
    def __init__(self, response: http1.Http1Response, endpoint: Endpoint) -> None:
        self._response = response
        self._endpoint = endpoint

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._response.raw_headers

    def header(self, name: str) -> str:
        return self._response.header(name)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except http1.Http1Error as exc:
            raise UpstreamError(f"engine {self._endpoint.id} failed mid-response: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


# -- aiohttp ------------------------------------------------------------------------------


class _AiohttpPool:
    """One aiohttp session (its connection pool), shared by a client and its reconfigured copies."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the server's event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No cap on connections: streams are long-lived and the engines queue.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
                # The body passes through as the engine encoded it.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )  # fmt: skip
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class AiohttpUpstream:
    def __init__(self, config: ProxyConfig, pool: _AiohttpPool | None = None) -> None:
        self._pool = pool or _AiohttpPool()
        # Per request, so that a reload's timeouts apply to the requests opened after it.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s,
                                              sock_read=config.read_timeout_s)  # fmt: skip

    def with_config(self, config: ProxyConfig) -> AiohttpUpstream:
        return AiohttpUpstream(config, self._pool)

    async def open(
        self, endpoint: Endpoint, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        session = self._pool.session()
        try:
            response = await session.request(method, f"{endpoint.url}{path}", headers=dict(headers), data=body or None,
                                             timeout=self._timeout)  # fmt: skip
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamConnectError(f"engine {endpoint.id} did not accept the connection in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(f"engine {endpoint.id} unreachable: {exc}") from exc
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
            raise UpstreamTimeout(f"engine {endpoint.id} did not answer in time") from exc
        except aiohttp.ServerDisconnectedError as exc:
            # The connection dropped before a response: nothing was sent to the client yet.
            raise UpstreamConnectError(f"engine {endpoint.id} closed the connection: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"engine {endpoint.id} failed: {type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response, endpoint)

    async def aclose(self) -> None:
        await self._pool.close()


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
        self._response = response
        self._endpoint = endpoint
        self._raw_headers = list(response.raw_headers)

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._raw_headers

    def header(self, name: str) -> str:
        return self._response.headers.get(name, "")

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"engine {self._endpoint.id} failed mid-response: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection goes back to the pool
        else:
            self._response.close()  # the engine sees the disconnect and aborts the request


# -- httpx (injected transports) ----------------------------------------------------------


class HttpxUpstream:
    def __init__(self, config: ProxyConfig, transport: httpx.AsyncBaseTransport,
                 client: httpx.AsyncClient | None = None) -> None:  # fmt: skip
        self._transport = transport
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout_s, read=config.read_timeout_s, write=config.read_timeout_s, pool=None
        )
        self._client = client or httpx.AsyncClient(transport=transport)

    def with_config(self, config: ProxyConfig) -> HttpxUpstream:
        return HttpxUpstream(config, self._transport, self._client)

    async def open(
        self, endpoint: Endpoint, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        request = self._client.build_request(method, f"{endpoint.url}{path}", headers=headers, content=body,
                                             timeout=self._timeout)  # fmt: skip
        try:
            return _HttpxResponse(await self._client.send(request, stream=True), endpoint)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UpstreamConnectError(f"engine {endpoint.id} unreachable: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"engine {endpoint.id} did not answer in time") from exc
        except httpx.RemoteProtocolError as exc:
            raise UpstreamConnectError(f"engine {endpoint.id} closed the connection: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"engine {endpoint.id} failed: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxResponse:
    def __init__(self, response: httpx.Response, endpoint: Endpoint) -> None:
        self._response = response
        self._endpoint = endpoint

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._response.headers.raw)

    def header(self, name: str) -> str:
        return str(self._response.headers.get(name, ""))

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(f"engine {self._endpoint.id} failed mid-response: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()
