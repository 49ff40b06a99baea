"""What worker processes share: each engine's in-flight count per worker, and drain flags."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from gateway.endpoints.registry import Endpoint
from gateway.endpoints.shared import SharedFleetState
from gateway.types import EngineId


def test_each_worker_sees_the_others_in_flight(tmp_path: Path) -> None:
    path = SharedFleetState.create(tmp_path / "state", rows=3, num_engines=2)
    a, b = SharedFleetState.attach(path), SharedFleetState.attach(path)
    assert {a.row, b.row} == {0, 1}
    a.set_in_flight(0, 5)
    b.set_in_flight(0, 2)
    b.set_in_flight(1, 7)
    assert a.others_in_flight(0) == 2 and b.others_in_flight(0) == 5
    assert a.others_in_flight(1) == 7 and b.others_in_flight(1) == 0
    b.set_draining(1, True)
    assert a.draining(1) and not a.draining(0)
    a.close()
    b.close()


def test_a_row_freed_by_a_dead_worker_is_taken_again_and_zeroed(tmp_path: Path) -> None:
    path = SharedFleetState.create(tmp_path / "state", rows=1, num_engines=1)
    first = SharedFleetState.attach(path)
    first.set_in_flight(0, 9)
    with pytest.raises(RuntimeError, match="every row"):
        SharedFleetState.attach(path)
    first.close()  # as the kernel does when the process dies
    second = SharedFleetState.attach(path)
    assert second.row == 0 and second.others_in_flight(0) == 0
    second.close()


def _worker(path: str, count: int, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event) -> None:
    state = SharedFleetState.attach(path)
    state.set_in_flight(0, count)
    ready.set()
    done.wait(10)


def test_processes_share_the_counts(tmp_path: Path) -> None:
    path = SharedFleetState.create(tmp_path / "state", rows=4, num_engines=1)
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    worker = context.Process(target=_worker, args=(str(path), 4, ready, done))
    worker.start()
    try:
        assert ready.wait(30)
        mine = SharedFleetState.attach(path)
        endpoint = Endpoint(EngineId("e"), "http://e", shared=mine, shared_index=0)
        endpoint.add_in_flight(1)
        assert endpoint.total_in_flight == 5 and endpoint.load == 5.0
        endpoint.set_draining(True)
        assert not endpoint.available()
        mine.close()
    finally:
        done.set()
        worker.join(10)
