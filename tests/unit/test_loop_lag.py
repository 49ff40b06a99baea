"""gateway.limits.loop_lag: a standing queue on the event loop is told apart from bursts and
single stalls, on a real event loop and tick by tick."""

from __future__ import annotations

import asyncio
import time

from gateway.limits.loop_lag import EventLoopLag


def ticks(lag: EventLoopLag, start: float, lateness_s: list[float], every_s: float = 0.005) -> float:
    now = start
    for late_s in lateness_s:
        now += every_s + late_s
        lag.observe(now, late_s)
    return now


def test_a_loop_late_on_every_tick_of_a_window_has_a_standing_lag() -> None:
    lag = EventLoopLag(window_s=0.1, clock=lambda: 0.0)
    lag.start_at(0.0)
    ticks(lag, 0.0, [0.03] * 4)  # 4 ticks 30 ms late: 140 ms, past the window's end
    assert lag.standing_s == 0.03


def test_a_burst_that_drains_within_the_window_leaves_no_standing_lag() -> None:
    lag = EventLoopLag(window_s=0.1, clock=lambda: 0.0)
    lag.start_at(0.0)
    ticks(lag, 0.0, [0.04, 0.03] + [0.0] * 10)  # 80 ms of lateness, then on time: 135 ms in all
    assert lag.standing_s == 0.0


def test_a_single_stall_is_not_a_queue() -> None:
    lag = EventLoopLag(window_s=0.1, clock=lambda: 0.0)
    lag.start_at(0.0)
    ticks(lag, 0.0, [0.3])  # the window's only tick, 300 ms late (a long garbage collection)
    assert lag.standing_s == 0.0


def test_a_hogged_loop_shows_its_lag_and_loses_it_once_the_hog_stops() -> None:
    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        lag = EventLoopLag(interval_s=0.005, window_s=0.1)
        lag.start(loop)
        hogging = True

        def hog() -> None:  # 30 ms of work on every pass of the loop
            time.sleep(0.03)
            if hogging:
                loop.call_soon(hog)

        loop.call_soon(hog)
        deadline = time.monotonic() + 5
        while lag.standing_s < 0.02 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        hogged = lag.standing_s
        hogging = False
        deadline = time.monotonic() + 5
        while lag.standing_s >= 0.005 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        lag.stop()
        return hogged, lag.standing_s

    hogged, after = asyncio.run(scenario())
    assert hogged >= 0.02  # ~0.03 and a bit: each pass holds the loop 30 ms
    assert after < 0.005  # timer jitter only (uvloop's clock has millisecond steps)


def test_late_now_is_how_far_the_running_pass_has_gone_past_the_next_tick() -> None:
    clock = [0.0]
    lag = EventLoopLag(interval_s=0.005, clock=lambda: clock[0])
    assert lag.late_now_s() == 0.0  # not started

    async def scenario() -> tuple[float, float]:
        lag.start(asyncio.get_running_loop())  # the next tick due at 5 ms
        clock[0] = 0.002
        early = lag.late_now_s()
        clock[0] = 0.030  # the loop has not come back to its timers since
        late = lag.late_now_s()
        lag.stop()
        return early, late

    early, late = asyncio.run(scenario())
    assert early == 0.0 and abs(late - 0.025) < 1e-9
    assert lag.late_now_s() == 0.0  # stopped
