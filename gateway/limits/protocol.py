"""uvicorn's httptools protocol with the limits uvicorn lacks (`limits:` in the YAML).

uvicorn (0.3x-0.5x) bounds none of these for httptools: how long a client may take to send its
headers or body, how large its headers may be (httptools buffers a header name or value
until it is complete, so a 100 MB header was read into memory), how many connections are
open. Here, per connection:

- a cap on open connections: past `max_connections`, a new connection gets a 503 and is
  closed at once, before anything of it is read; the connections already open are served;
- header read timeout: from the connection's opening (or the end of the previous response)
  until the headers are complete. Past it, a connection that has sent part of a request gets
  408, one that has sent nothing is closed;
- body read timeout: the longest gap between two pieces of the body, and the whole body's
  time → 408 (or just a close, when the app already answered);
- header bytes and count: bytes are counted as they arrive, so a header section over the
  limit is refused (431) after at most one read (256 KiB) beyond it; the count is checked
  when the headers are complete.

Cost per request: attribute writes and two clock reads; no timer is armed or cancelled per
request. One watchdog timer per connection wakes at the current phase's deadline and, when
the phase has moved on meanwhile, sleeps until the new one (at most once per
`header_read_timeout_s` for a busy connection); during the app's own work it sleeps not at all.

uvicorn builds a protocol per connection as `http(config=, server_state=, app_state=)`: pass
`limited_http_protocol(limits)` as `http=`. It pickles (this class by reference, the limits
by value), so `server.workers` processes get it too. Rejections are counted through the
callable the app's lifespan puts in its state under `COUNT_REJECTION` (gateway.app).
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
from collections.abc import Callable
from typing import Any, cast

from starlette.responses import JSONResponse
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.config import LimitsConfig
from gateway.errors import error_body

# Key of the app's lifespan state under which a `Callable[[str], None]` counts a rejection.
COUNT_REJECTION = "count_rejection"

# What the connection is waiting for; the watchdog's deadline depends on it.
IDLE = 0  # the first byte of a request
HEADERS = 1  # the rest of the headers
BODY = 2  # the body: the app runs already
APP = 3  # nothing: the request is read, the app answers
LINGER = 4  # an error was sent: what the client still sends is read and dropped

# After an error answer the connection half-closes and reads on for this long before closing:
# closing with the client's bytes unread would reset the connection, and the client could
# lose the answer (nginx's lingering close).
LINGER_S = 2.0


def limited_http_protocol(limits: LimitsConfig) -> type[asyncio.Protocol]:
    """What to pass as uvicorn's `http=`: the protocol class with `limits` bound."""
    # uvicorn calls `http` like a class; a partial of a module-level class pickles to workers.
    return cast("type[asyncio.Protocol]", functools.partial(LimitedHttpToolsProtocol, limits=limits))


@functools.lru_cache(maxsize=32)
def error_bytes(status: int, message: str, error_type: str, code: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response with an OpenAI-shaped JSON body, closing the connection."""
    body = json.dumps(error_body(message, error_type, code)).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]  # fmt: skip
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def header_section_bytes(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """Bytes of a request line and headers as a client writes them ("Name: value\\r\\n")."""
    return len(method) + len(url) + len(b"  HTTP/1.1\r\n\r\n") + sum(len(n) + len(v) + 4 for n, v in headers)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: LimitsConfig,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._phase = IDLE
        self._idle_since = 0.0  # loop time the header timeout counts from
        self._body_since = 0.0
        self._body_read_at = 0.0  # last piece of body
        self._header_bytes = 0  # of the current request, in the reads before the current one
        self._read_bytes = 0  # size of the read being parsed
        self._watchdog: asyncio.TimerHandle | None = None

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self._limits.max_connections:
            # Refused before anything is read: the fd is given back at once.
            self.transport = transport
            self._phase = LINGER
            transport.write(error_bytes(503, "The gateway has too many open connections; retry shortly.",
                                        "service_unavailable", "too_many_connections", self._limits.retry_after_s))  # fmt: skip
            transport.close()
            self._count("connections")
            return
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._watchdog = self.loop.call_later(self._limits.header_read_timeout_s, self._watch)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == LINGER:
            return
        self._read_bytes = len(data)
        super().data_received(data)
        phase = self._phase
        if phase == BODY:  # a piece of body came (a request read whole is past BODY already)
            self._body_read_at = self.loop.time()
        elif phase == HEADERS:  # still: count this read towards the header section
            self._header_bytes += len(data)
            if self._header_bytes > self._limits.max_header_bytes:
                self._header_bytes_exceeded()

    # Parser callbacks (uvicorn's, plus the phase)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = HEADERS
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        limits = self._limits
        rejection = None
        if len(self.headers) > limits.max_header_count:
            rejection = ("header_count", f"Too many request headers: the limit is {limits.max_header_count}.")
        elif self._header_bytes + self._read_bytes > limits.max_header_bytes and header_section_bytes(
            self.parser.get_method(), self.url, self.headers
        ) > limits.max_header_bytes:
            rejection = ("header_bytes", f"Request headers exceed the limit of {limits.max_header_bytes} bytes.")
        if rejection is not None:
            self._count(rejection[0])
            # uvicorn runs the app it holds for this request: a 431 answer instead, which closes.
            app, self.app = self.app, _refusal_431(rejection[1])
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._phase = BODY
        self._body_since = self._body_read_at = self.loop.time()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle.response_complete:  # answered before the body was read (401, 413, 431)
            self._await_next_request()
        else:
            self._phase = APP

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing() or queued:
            return  # a pipelined request runs now: its phase is already known
        if self._phase == APP:
            self._await_next_request()
        elif self._phase == HEADERS:  # the next request began during this one
            self._idle_since = self.loop.time()
            self._ensure_watchdog()

    # Timeouts

    def _await_next_request(self) -> None:
        self._phase = IDLE
        self._idle_since = self.loop.time()
        self._ensure_watchdog()

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self._limits.header_read_timeout_s, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        if self.transport.is_closing() or self._phase >= APP:
            return  # the app's own time is bounded elsewhere (proxy timeouts); re-armed after it
        now = self.loop.time()
        limits = self._limits
        if self._phase == BODY:
            if self.flow.read_paused:
                self._body_read_at = now  # the app is behind, not the client
            deadline = min(self._body_read_at + limits.body_read_timeout_s, self._body_since + limits.body_total_timeout_s)
        else:
            deadline = self._idle_since + limits.header_read_timeout_s
        if now < deadline:
            self._watchdog = self.loop.call_later(deadline - now, self._watch)
        else:
            self._time_out()

    def _time_out(self) -> None:
        phase = self._phase
        self._count("body_timeout" if phase == BODY else "header_timeout")
        if phase == IDLE:  # nothing of a request came: nothing to answer
            self.transport.close()
            return
        answered = phase == BODY and self.cycle.response_started
        if phase == BODY and not self.cycle.response_complete:
            # The app waits for the rest of the body: it gets a disconnect now, and what it
            # would still send is dropped (uvicorn drops sends on a disconnected cycle).
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        limits = self._limits
        message = (
            f"The request body did not arrive in time: at most {limits.body_read_timeout_s:g} s between "
            f"two pieces, {limits.body_total_timeout_s:g} s in all."
            if phase == BODY
            else f"The request headers did not arrive within {limits.header_read_timeout_s:g} s."
        )
        self._close_with(None if answered else error_bytes(408, message, "invalid_request_error", "request_timeout"))

    # Refusals

    def _header_bytes_exceeded(self) -> None:
        self._count("header_bytes")
        self._close_with(error_bytes(431, f"Request headers exceed the limit of {self._limits.max_header_bytes} bytes.",
                                     "invalid_request_error", "request_header_fields_too_large"))  # fmt: skip

    def _close_with(self, response: bytes | None) -> None:
        """Send `response`, then half-close and read on (dropping it) until the client closes or
        LINGER_S passes."""
        self._phase = LINGER
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        transport = self.transport
        if response is not None:
            transport.write(response)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()
        self._watchdog = self.loop.call_later(LINGER_S, transport.close)

    def _count(self, reason: str) -> None:
        count: Callable[[str], None] | None = self.app_state.get(COUNT_REJECTION)
        if count is not None:
            count(reason)



def _refusal_431(message: str) -> JSONResponse:
    """An ASGI app (a response) answering 431 and closing the connection."""
    body = error_body(message, "invalid_request_error", "request_header_fields_too_large")
    return JSONResponse(body, status_code=431, headers={"connection": "close"})
