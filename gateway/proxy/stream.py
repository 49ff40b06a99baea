"""Pass an engine's response to the client byte for byte, as it arrives.

`PassthroughResponse` is an ASGI response that forwards `aiter_raw()` chunks unchanged (no
SSE parsing, no buffering), watches for the client going away, and in every case closes the
upstream response, so an abandoned stream makes the engine abort the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Literal

import anyio
import anyio.lowlevel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import UpstreamError, error_body
from gateway.proxy.upstream import UpstreamResponse, response_headers
from gateway.proxy.usage import UsageTap

logger = logging.getLogger(__name__)

Outcome = Literal["complete", "client_disconnected", "upstream_failed", "upstream_stalled"]


class PassthroughResponse(Response):
    def __init__(
        self,
        upstream: UpstreamResponse,
        extra_headers: dict[str, str],
        on_first_byte: Callable[[], None],
        on_finish: Callable[[Outcome], None],
        tap: UsageTap | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        """`idle_timeout_s`: longest silence of the engine between two chunks; past it the
        response ends (an in-band error for an event stream) and the engine aborts."""
        self._upstream = upstream
        self._idle_timeout_s = idle_timeout_s
        # Starlette's Response keeps headers in `raw_headers`; set it so anything reading
        # `response.headers` (middleware, logging) sees what is sent.
        self.raw_headers = response_headers(upstream) + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers.items()
        ]
        self._on_first_byte = on_first_byte
        self._on_finish = on_finish
        self._tap = tap
        self.status_code = upstream.status_code
        self.background = None
        self._upstream_done = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Plain asyncio, not an anyio task group: per request, a task group and its cancel
        # scope cost ~90 µs here (its cancel() formats the task's repr), a task ~10 µs.
        forwarding = asyncio.current_task()
        assert forwarding is not None
        client_left = False

        async def watch_disconnect() -> None:
            nonlocal client_left
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    # A disconnect after the engine's last byte is the normal end. Before it,
                    # `_forward` has an await ahead (it sets `_upstream_done` before its last
                    # send), where the cancellation lands.
                    if not self._upstream_done:
                        client_left = True
                        forwarding.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        outcome: Outcome = "complete"
        try:
            outcome = await self._forward(send)
        except asyncio.CancelledError:
            if not client_left or forwarding.uncancel() > 0:
                raise  # the server's cancellation (shutdown), not ours
            outcome = "client_disconnected"
        except OSError:
            # The server could not write to the client: it is gone.
            outcome = "client_disconnected"
        finally:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()
            self._on_finish(outcome)

    async def discard(self) -> None:
        """Never sent (the client left as it was made): close the engine's response, which
        aborts the request there, and end it as a client disconnect."""
        with anyio.CancelScope(shield=True):
            await self._upstream.aclose()
        self._on_finish("client_disconnected")

    async def _forward(self, send: Send) -> Outcome:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        idle_timeout_s = self._idle_timeout_s
        if idle_timeout_s is None:  # a whole answer: no stall to watch for
            return await self._forward_body(send, None)
        # Armed only while waiting for the engine: a slow client (send blocking) is no stall.
        with anyio.CancelScope(deadline=anyio.current_time() + idle_timeout_s) as silence:
            outcome = await self._forward_body(send, silence)
        if silence.cancelled_caught:
            logger.warning("engine sent nothing for %.0f s mid-response: ending it", idle_timeout_s)
            await self._end_with_error(send, f"engine sent nothing for {idle_timeout_s:g} s")
            return "upstream_stalled"
        return outcome

    async def _forward_body(self, send: Send, silence: anyio.CancelScope | None) -> Outcome:
        first = True
        try:
            async for chunk in self._upstream.aiter_raw():
                if first:
                    first = False
                    self._on_first_byte()
                else:
                    # Reading buffered upstream data and writing to a socket with room both
                    # return without suspending: a fast stream would otherwise hold the event
                    # loop and stall every other request. Yield once per chunk after the first
                    # (an answer that comes whole, in one chunk, needs no extra turn of the loop).
                    await anyio.lowlevel.checkpoint()
                if silence is not None:
                    silence.deadline = math.inf
                if self._tap is not None:
                    chunk = self._tap.feed(chunk)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if silence is not None and self._idle_timeout_s is not None:
                    silence.deadline = anyio.current_time() + self._idle_timeout_s
        except UpstreamError as exc:
            # Bytes already reached the client: no retry is possible.
            logger.warning("upstream failed mid-response: %s", exc)
            await self._end_with_error(send, f"engine failed mid-stream: {type(exc).__name__}")
            return "upstream_failed"
        self._upstream_done = True
        tail = self._tap.finish() if self._tap is not None else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return "complete"

    async def _end_with_error(self, send: Send, message: str) -> None:
        """For an event stream, say what happened in-band, the way vLLM reports its own
        stream errors; any other body just ends (short of its length: the client sees it)."""
        tail = b""
        if self._upstream.header("content-type").startswith("text/event-stream"):
            body = error_body(message, "upstream_error", "bad_gateway")
            tail = b"data: " + json.dumps(body).encode() + b"\n\n"
        self._upstream_done = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})
