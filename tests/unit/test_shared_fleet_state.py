"""What worker processes share: each engine's in-flight count per worker, and drain flags."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from gateway.endpoints.registry import Endpoint
from gateway.endpoints.shared import SharedFleetState
from gateway.types import EngineId


def test_each_worker_sees_the_others_in_flight(tmp_path: Path) -> None:
    path = SharedFleetState.create(tmp_path / "state", rows=3, slots=4)
    a, b = SharedFleetState.attach(path), SharedFleetState.attach(path)
    assert {a.row, b.row} == {0, 1}
    x, y = a.slot("x"), a.slot("y")
    a.set_in_flight(x, 5)
    b.set_in_flight(b.slot("x"), 2)
    b.set_in_flight(b.slot("y"), 7)
    assert a.others_in_flight(x) == 2 and b.others_in_flight(b.slot("x")) == 5
    assert a.others_in_flight(y) == 7 and b.others_in_flight(b.slot("y")) == 0
    b.set_draining(b.slot("y"), True)
    assert a.draining(y) and not a.draining(x)
    a.close()
    b.close()


def test_engines_have_the_same_column_in_every_worker_whatever_their_order(tmp_path: Path) -> None:
    """Workers reload the configuration one after another: for a moment they list different
    engines, in different orders; a column must mean the same engine to all of them."""
    path = SharedFleetState.create(tmp_path / "state", rows=2, slots=3)
    a, b = SharedFleetState.attach(path), SharedFleetState.attach(path)
    assert [a.slot("e1"), a.slot("e2")] == [0, 1]
    assert [b.slot("e3"), b.slot("e2"), b.slot("e1")] == [2, 1, 0]  # e3 is new: the next free column
    # A name never seen since start-up, with every column taken: no room (a restart makes some).
    with pytest.raises(RuntimeError, match="no room for engine e4"):
        a.slot("e4")
    assert a.slot("e3") == 2  # what b took is found, not taken twice
    a.close()
    b.close()


def test_a_row_freed_by_a_dead_worker_is_taken_again_and_zeroed(tmp_path: Path) -> None:
    path = SharedFleetState.create(tmp_path / "state", rows=1, slots=1)
    first = SharedFleetState.attach(path)
    first.set_in_flight(first.slot("e"), 9)
    with pytest.raises(RuntimeError, match="every row"):
        SharedFleetState.attach(path)
    first.close()  # as the kernel does when the process dies
    second = SharedFleetState.attach(path)
    assert second.row == 0 and second.others_in_flight(second.slot("e")) == 0
    second.close()


def _worker(path: str, count: int, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event) -> None:
    state = SharedFleetState.attach(path)
    state.set_in_flight(state.slot("e"), count)
    ready.set()
    done.wait(10)


def test_processes_share_the_counts(tmp_path: Path) -> None:
    path = SharedFleetState.create(tmp_path / "state", rows=4, slots=2)
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    worker = context.Process(target=_worker, args=(str(path), 4, ready, done))
    worker.start()
    try:
        assert ready.wait(30)
        mine = SharedFleetState.attach(path)
        endpoint = Endpoint(EngineId("e"), "http://e", shared=mine, shared_index=mine.slot("e"))
        endpoint.add_in_flight(1)
        assert endpoint.total_in_flight == 5 and endpoint.load == 5.0
        endpoint.set_draining(True)
        assert not endpoint.available()
        mine.close()
    finally:
        done.set()
        worker.join(10)


def test_a_worker_serves_once_every_worker_is_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers wait for each other before serving, so each follows the engines' events
    before any request makes the engines announce blocks; one that cannot start does not
    keep the others closed for longer than WORKERS_READY_TIMEOUT_S."""
    import asyncio

    from gateway import runtime

    path = SharedFleetState.create(tmp_path / "state", rows=4, slots=2)
    a, b = SharedFleetState.attach(path), SharedFleetState.attach(path)

    async def both_start() -> None:
        first = asyncio.create_task(runtime.wait_for_other_workers(a, 2))
        await asyncio.sleep(0.2)
        assert not first.done()  # b has not started yet
        await asyncio.wait_for(runtime.wait_for_other_workers(b, 2), 5)
        await asyncio.wait_for(first, 5)

    asyncio.run(both_start())
    # A worker restarted later finds the marks there and serves at once.
    c = SharedFleetState.attach(path)
    asyncio.run(asyncio.wait_for(runtime.wait_for_other_workers(c, 2), 1))
    # One of three never starts: the others serve after the timeout.
    monkeypatch.setattr(runtime, "WORKERS_READY_TIMEOUT_S", 0.3)
    asyncio.run(asyncio.wait_for(runtime.wait_for_other_workers(a, 4), 5))
    for state in (a, b, c):
        state.close()
