"""Caps on requests in flight: for this worker (`limits.max_concurrent_requests` → 503) and per
client API key (`limits.max_concurrent_requests_per_key`, or the key's own → 429), both with
`Retry-After` and at once: a request over a cap waits for nothing. And on the worker's own
backlog: while its event loop runs a standing `limits.max_event_loop_lag_s` behind
(gateway.limits.loop_lag), or the pass it runs has gone that far past its timers, while
requests arrive faster than a few clients send them, new requests get 503 at once, so the
worker catches up instead of every request's latency growing with a queue it cannot drain;
after such a stretch it admits, per window of the lag's, a little less than it last let in
(raised while it keeps up), until a window refuses nothing.

An ASGI middleware, so a slot is held until the response's last byte (a stream included) and
given back whatever happens. Operators' endpoints (`/health`, `/metrics`, `/admin/*`,
`/debug/*`) are never counted nor refused: a saturated gateway still answers its probes.
Per request: a path test and counter arithmetic; with per-key caps, the key lookup the
handler would do anyway (its answer is kept in the scope, gateway.api.auth)."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.auth import APIKeys
from gateway.errors import GatewayError, Overloaded, TooManyRequests, error_response
from gateway.limits.loop_lag import EventLoopLag

UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})
UNCOUNTED_PREFIXES = ("/admin/", "/debug/")
# A lagging loop is a backlog of requests only while they keep arriving: at least this many
# arriving while it lags, within the last one to two `ARRIVALS_WINDOW_S` (80-160 per second).
# Behind a loop 20 ms late, a client sending one request at a time sends fewer than 10 per
# 0.2 s, so a few such clients are never refused: their lag is the worker's own work (a
# tokenizer loading) or a CPU that other processes hold, and refusing would turn a slow answer
# into none (a sequential test client was refused while a fresh worker loaded its tokenizer on
# a busy machine). Requests in flight are no such measure: in an overload the backlog waits
# before admission, and with "at least 4 in flight" a loop at twice its capacity admitted
# enough to time out 343-382 requests of 5,000 (bench.overhead at 1,000 req/s, against none
# without that condition).
MIN_ARRIVALS_FOR_LAG = 16
ARRIVALS_WINDOW_S = 0.1
# The standing lag reads a whole window: between its readings an overload is admitted whole
# for up to a window (0.1 s), then refused whole, and the loop's passes (each request's read,
# first step and answer fall in different passes) grew to tens of ms: admitted requests
# waited 0.1-0.15 s at p99 (one worker offered 1,600-2,000 req/s against ~1,100 it serves).
# So a pass already `max_event_loop_lag_s` past its timers refuses the rest of its arrivals
# too: 73-82 ms at p99 then (with a 10 ms lag cap; the client's connections open already).
# A flood only (at least this many arriving behind it, 320-640 per second): a busy machine
# that holds the worker off its core for a pass delays a test's or a few clients' burst,
# which is no reason to refuse it.
MIN_ARRIVALS_IN_A_LONG_PASS = 64
# Refusing everything while the loop lags, then admitting everything once it is on time again,
# makes an overload a cycle: each time, a whole window (0.1 s) of requests is admitted at
# the offered rate, and its backlog is what the last of them wait (admitted p99 104-239 ms in
# six runs of two workers offered 2,000 req/s on two cores). So a window the loop ran behind
# through also caps what the next windows admit (AIMD): `ADMIT_DECREASE` of what that window
# admitted, raised by `ADMIT_INCREASE` for each window the loop keeps up with the cap refusing,
# removed once a window refuses nothing (the excess is gone). Never below
# `MIN_ARRIVALS_FOR_LAG` a window: a few clients are never capped. With it and a 5 ms lag cap:
# 67-95 ms in four runs (without the cap, 5 ms: 89-132).
ADMIT_DECREASE = 0.8
ADMIT_INCREASE = 1.05


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_requests: int,
        api_keys: Callable[[], APIKeys],
        retry_after_s: int,
        on_reject: Callable[[str], None],
        loop_lag: EventLoopLag | None = None,
        max_loop_lag_s: float = float("inf"),
    ) -> None:
        """`api_keys`: the keys in force now (a reload may change them, and their caps);
        `loop_lag`: the worker's event-loop lag, refused past `max_loop_lag_s`."""
        self.app = app
        self._max_requests = max_requests
        self._loop_lag = loop_lag
        self._max_loop_lag_s = max_loop_lag_s
        self._in_flight = 0
        self._window_started_s = time.monotonic()
        self._num_arrived = 0  # in the window that started then
        self._num_arrived_before = 0  # in the window before it
        # The loop-lag window now open (`loop_lag.num_windows` once it closes): what it admitted
        # and refused, and the cap on admissions per window (no cap: infinite).
        self._lag_windows_seen = 0
        self._admitted_in_window = 0
        self._refused_in_window = 0
        self._admit_cap = float("inf")
        self._api_keys = api_keys
        # By the key itself: its position may change at a reload.
        self._key_in_flight: dict[bytes, int] = {}
        self._retry_after = {"retry-after": str(retry_after_s)}
        self._on_reject = on_reject

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNCOUNTED_PATHS or path.startswith(UNCOUNTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        key: bytes | None = None
        keys = self._api_keys()
        if keys.has_caps:
            position = keys.identify(scope)
            cap = None if position is None else keys.cap(position)
            if position is not None and cap is not None:
                key = keys.key(position)
                if self._key_in_flight.get(key, 0) >= cap:
                    await self._refuse(scope, receive, send, "key_concurrency", TooManyRequests(
                        f"Too many concurrent requests for this API key (limit {cap}); retry shortly."))  # fmt: skip
                    return
        if self._in_flight >= self._max_requests:
            await self._refuse(scope, receive, send, "concurrency", Overloaded(
                "The gateway is at its limit of concurrent requests; retry shortly."))  # fmt: skip
            return
        lag = self._loop_lag
        if lag is not None:
            if lag.num_windows != self._lag_windows_seen:
                self._next_lag_window(lag)
            if self._behind(lag) or self._admitted_in_window >= self._admit_cap:
                self._refused_in_window += 1
                await self._refuse(scope, receive, send, "event_loop_lag", Overloaded(
                    "The gateway is receiving more requests than it can process; retry shortly."))  # fmt: skip
                return
            self._admitted_in_window += 1
        self._in_flight += 1
        if key is not None:
            self._key_in_flight[key] = self._key_in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            if key is not None:
                remaining = self._key_in_flight[key] - 1
                if remaining:
                    self._key_in_flight[key] = remaining
                else:
                    del self._key_in_flight[key]

    def _behind(self, lag: EventLoopLag) -> bool:
        """The loop runs a standing `max_loop_lag_s` behind, or the pass it is in has run that
        far past its timers, while requests keep arriving (fewer needed for the first)."""
        if lag.standing_s > self._max_loop_lag_s:
            return self._recent_arrivals() >= MIN_ARRIVALS_FOR_LAG
        if lag.late_now_s() > self._max_loop_lag_s:
            return self._recent_arrivals() >= MIN_ARRIVALS_IN_A_LONG_PASS
        return False

    def _next_lag_window(self, lag: EventLoopLag) -> None:
        """The window just closed sets the cap on the next one's admissions."""
        admitted = self._admitted_in_window
        behind = lag.standing_s > self._max_loop_lag_s
        if behind and admitted >= MIN_ARRIVALS_FOR_LAG:
            self._admit_cap = max(MIN_ARRIVALS_FOR_LAG, ADMIT_DECREASE * admitted)
        elif not self._refused_in_window:
            self._admit_cap = float("inf")
        elif not behind:
            self._admit_cap *= ADMIT_INCREASE
        self._lag_windows_seen = lag.num_windows
        self._admitted_in_window = self._refused_in_window = 0

    def _recent_arrivals(self) -> int:
        """Requests that found the loop lagging in this window and the one before, this one
        included (counted only then: while the loop keeps up, a request reads the clock once,
        in `late_now_s`)."""
        now = time.monotonic()
        if now - self._window_started_s >= ARRIVALS_WINDOW_S:
            recent = now - self._window_started_s < 2 * ARRIVALS_WINDOW_S
            self._num_arrived_before = self._num_arrived if recent else 0
            self._num_arrived = 0
            self._window_started_s = now
        self._num_arrived += 1
        return self._num_arrived + self._num_arrived_before

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, reason: str, error: GatewayError) -> None:
        self._on_reject(reason)
        await error_response(error, headers=self._retry_after)(scope, receive, send)
