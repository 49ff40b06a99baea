"""What the gateway's worker processes (`server.workers`) share about each engine, through
one memory-mapped file: every worker's in-flight count on it, and whether it is draining.

Each worker owns a row and is the only writer of it, so no lock is needed: a reader adds the
other rows up and may see a count one update old, as it would with any scrape. A worker
claims its row by holding an exclusive `flock` on the row's lock file for its whole life; the
kernel releases it when the process dies, so a restarted worker takes a free row again (and
zeroes it: what a dead worker had in flight died with it).

    header: magic, rows, engines          (3 × int64)
    rows × engines × in_flight            (int64)
    engines × draining                    (int64: 0 or 1)
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path
from typing import IO

_MAGIC = 0x67770001
_HEADER = 3


class SharedFleetState:
    def __init__(self, path: Path, handle: IO[bytes], row: int, lock: IO[bytes] | None) -> None:
        self.path = path
        self._handle = handle
        self._map = mmap.mmap(handle.fileno(), 0)
        self._cells = memoryview(self._map).cast("q")
        magic, self.rows, self.num_engines = self._cells[0], self._cells[1], self._cells[2]
        if magic != _MAGIC:
            raise ValueError(f"{path} is not a gateway state file")
        self.row = row
        self._lock = lock

    @classmethod
    def create(cls, path: str | Path, rows: int, num_engines: int) -> Path:
        """Make the file (by the parent, before the workers start)."""
        path = Path(path)
        size = (_HEADER + rows * num_engines + num_engines) * 8
        with open(path, "wb") as blank:
            blank.write(b"\0" * size)
        with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
            cells = memoryview(mapped).cast("q")
            cells[0], cells[1], cells[2] = _MAGIC, rows, num_engines
            cells.release()
        return path

    @classmethod
    def attach(cls, path: str | Path) -> SharedFleetState:
        """Open the file and claim a free row (a worker, at start-up)."""
        path = Path(path)
        handle = open(path, "r+b")  # noqa: SIM115 - kept open for the mapping's life
        _, rows, _ = struct.unpack("qqq", handle.read(24))
        for row in range(rows):
            lock = open(f"{path}.row{row}", "a+b")  # noqa: SIM115 - held for the worker's life
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            state = cls(path, handle, row, lock)
            for engine in range(state.num_engines):
                state.set_in_flight(engine, 0)
            return state
        handle.close()
        raise RuntimeError(f"every row of {path} is taken: more workers than rows")

    def _in_flight_cell(self, row: int, engine: int) -> int:
        return _HEADER + row * self.num_engines + engine

    def set_in_flight(self, engine: int, count: int) -> None:
        self._cells[self._in_flight_cell(self.row, engine)] = count

    def others_in_flight(self, engine: int) -> int:
        """What the other workers have in flight on `engine`."""
        cells, stride = self._cells, self.num_engines
        total = sum(cells[_HEADER + row * stride + engine] for row in range(self.rows))
        return total - cells[self._in_flight_cell(self.row, engine)]

    def _draining_cell(self, engine: int) -> int:
        return _HEADER + self.rows * self.num_engines + engine

    def draining(self, engine: int) -> bool:
        return bool(self._cells[self._draining_cell(engine)])

    def set_draining(self, engine: int, draining: bool) -> None:
        self._cells[self._draining_cell(engine)] = int(draining)

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        self._handle.close()
        if self._lock is not None:
            self._lock.close()  # releases the row

    @staticmethod
    def remove(path: str | Path) -> None:
        """Delete the file and its row locks (by the parent, after the workers are gone)."""
        path = Path(path)
        for leftover in [path, *path.parent.glob(f"{path.name}.row*")]:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
