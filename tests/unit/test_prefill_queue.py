"""The wait behind prefills already sent to an engine (gateway.endpoints.prefill_queue)."""

from __future__ import annotations

import pytest

from gateway.endpoints.prefill_queue import PrefillQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_the_wait_shrinks_while_the_engine_works(clock: Clock) -> None:
    queue = PrefillQueue(clock=clock)
    assert queue.wait_s() == 0.0
    queue.add(1.0)
    assert queue.wait_s() == pytest.approx(1.0)
    clock.now += 0.4
    assert queue.wait_s() == pytest.approx(0.6)
    clock.now += 2.0  # late: the engine is still on it, but by how much is unknown
    assert queue.wait_s() == 0.0


def test_work_queues_behind_work(clock: Clock) -> None:
    queue = PrefillQueue(clock=clock)
    queue.add(1.0)
    clock.now += 0.5
    queue.add(1.0)
    assert queue.wait_s() == pytest.approx(1.5)


def test_an_early_first_byte_gives_no_credit_to_the_rest(clock: Clock) -> None:
    queue = PrefillQueue(clock=clock)
    queue.add(1.0)
    queue.add(1.0)
    clock.now += 0.8
    queue.started_answering(1.0)  # done in 0.8 s: the second has not started
    assert queue.wait_s() == pytest.approx(1.0)
    clock.now += 0.5
    assert queue.wait_s() == pytest.approx(0.5)


def test_work_beyond_the_answered_request_counts_for_the_next(clock: Clock) -> None:
    queue = PrefillQueue(clock=clock)
    queue.add(1.0)
    queue.add(1.0)
    clock.now += 1.5
    queue.started_answering(1.0)
    assert queue.wait_s() == pytest.approx(0.5)
    queue.started_answering(1.0)
    assert queue.pending_s == 0.0 and queue.wait_s() == 0.0


def test_an_abandoned_request_leaves_the_progress_on_the_others(clock: Clock) -> None:
    queue = PrefillQueue(clock=clock)
    queue.add(1.0)
    queue.add(2.0)
    clock.now += 0.5
    queue.abandoned(2.0)  # the one behind was cancelled
    assert queue.wait_s() == pytest.approx(0.5)


def test_a_transfer_shortens_a_queued_prediction(clock: Clock) -> None:
    queue = PrefillQueue(clock=clock)
    queue.add(2.0)
    queue.adjust(-1.5)
    assert queue.wait_s() == pytest.approx(0.5)
