"""The upstream HTTP client: opens a streamed request to one engine and maps httpx's errors
onto the gateway's error tree. This is the only module that catches httpx exceptions."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from gateway.config import ProxyConfig
from gateway.endpoints.registry import Endpoint
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout

# RFC 9110 §7.6.1 hop-by-hop headers, plus those httpx/uvicorn recompute for each hop.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip
# Client credentials are for the gateway, never for the engines (they have their own key).
_NOT_FORWARDED = HOP_BY_HOP | {"authorization", "cookie"}


def build_client(config: ProxyConfig, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=config.connect_timeout_s, read=config.read_timeout_s, write=config.read_timeout_s, pool=None
    )
    # No cap on connections: streams are long-lived and the engines do their own queueing.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30)
    return httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)


def upstream_headers(incoming: Mapping[str, str], endpoint: Endpoint, request_id: str) -> dict[str, str]:
    headers = {k: v for k, v in incoming.items() if k.lower() not in _NOT_FORWARDED | {"content-type"}}
    headers["x-request-id"] = request_id
    # The gateway parsed the body as JSON whatever the client declared.
    headers["content-type"] = "application/json"
    if endpoint.api_key:
        headers["authorization"] = f"Bearer {endpoint.api_key}"
    return headers


# The gateway's own server adds these; forwarding the engine's would duplicate them.
_SERVER_SET = frozenset({"date", "server"})


def response_headers(upstream: httpx.Headers) -> list[tuple[bytes, bytes]]:
    """Raw headers for the client. Content-Length is kept: the body passes through unchanged."""
    skip = (HOP_BY_HOP - {"content-length"}) | _SERVER_SET
    return [(k, v) for k, v in upstream.raw if k.decode("latin-1").lower() not in skip]


async def read_small(
    response: httpx.Response, endpoint: Endpoint, limit: int = 4096
) -> tuple[bytes, httpx.Response] | None:
    """When `response`'s body is small (a Content-Length up to `limit`), read it: returns the
    bytes (raw, as the engine sent them) and an equivalent unread response over them, and
    closes the original. Otherwise None, `response` untouched. A failed read: UpstreamError."""
    length = response.headers.get("content-length", "")
    if not length.isdigit() or int(length) > limit:
        return None
    try:
        content = b"".join([chunk async for chunk in response.aiter_raw()])
    except httpx.HTTPError as exc:
        raise UpstreamError(f"engine {endpoint.id} failed: {exc}") from exc
    finally:
        await response.aclose()
    copy = httpx.Response(
        response.status_code, headers=response.headers, stream=httpx.ByteStream(content), request=response.request
    )
    return content, copy


async def open_stream(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str = "POST",
) -> httpx.Response:
    """Send the request and return once the response headers arrived; the body is unread.
    `path` may carry a query string.

    Raises UpstreamConnectError when nothing reached the engine (safe to retry elsewhere),
    UpstreamTimeout when the engine did not answer in time, UpstreamError otherwise.
    """
    request = client.build_request(method, f"{endpoint.url}{path}", headers=headers, content=body)
    try:
        return await client.send(request, stream=True)
    except httpx.ConnectError as exc:
        raise UpstreamConnectError(f"engine {endpoint.id} unreachable: {exc}") from exc
    except httpx.ConnectTimeout as exc:
        raise UpstreamConnectError(f"engine {endpoint.id} did not accept the connection in time") from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"engine {endpoint.id} did not answer in time") from exc
    except httpx.RemoteProtocolError as exc:
        # The connection dropped before a response: nothing was sent to the client yet.
        raise UpstreamConnectError(f"engine {endpoint.id} closed the connection: {exc}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"engine {endpoint.id} failed: {exc}") from exc
