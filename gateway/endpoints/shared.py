"""What the gateway's worker processes (`server.workers`) share about each engine, through
one memory-mapped file: every worker's in-flight count on it, and whether it is draining.

Engines have columns by name, not by position in the configuration: each worker reloads the
configuration on its own (gateway.reload), so for a moment two workers may run different
engine lists, and a column must mean the same engine to both. A worker takes an engine's
column by writing the name's key into the first free slot of the name table, under an
exclusive `flock` of the file; a column is never given to another name, so readers need no
lock. The file has room for `slots` names over the gateway's life (reloads included).

Each worker owns a row and is the only writer of it, so no lock is needed for the counts: a
reader adds the other rows up and may see a count one update old, as it would with any scrape.
A worker claims its row by holding an exclusive `flock` on the row's lock file for its whole
life; the kernel releases it when the process dies, so a restarted worker takes a free row
again (and zeroes it: what a dead worker had in flight died with it).

    header: magic, rows, slots            (3 × int64)
    slots × name key                      (int64: a hash of the engine's name; 0: free)
    rows × slots × in_flight              (int64)
    slots × draining                      (int64: 0 or 1)
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path
from typing import IO

import xxhash

_MAGIC = 0x67770002
_HEADER = 3
# Distinct engine names a gateway can meet over its life; 1 MiB of file at 128 rows.
DEFAULT_SLOTS = 1024


class SharedFleetState:
    def __init__(self, path: Path, handle: IO[bytes], row: int, lock: IO[bytes] | None) -> None:
        self.path = path
        self._handle = handle
        self._map = mmap.mmap(handle.fileno(), 0)
        self._cells = memoryview(self._map).cast("q")
        magic, self.rows, self.slots = self._cells[0], self._cells[1], self._cells[2]
        if magic != _MAGIC:
            raise ValueError(f"{path} is not a gateway state file")
        self.row = row
        self._lock = lock
        self._slot_of: dict[str, int] = {}  # names this worker looked up already

    @classmethod
    def create(cls, path: str | Path, rows: int, slots: int = DEFAULT_SLOTS) -> Path:
        """Make the file (by the parent, before the workers start)."""
        path = Path(path)
        size = (_HEADER + slots + rows * slots + slots) * 8
        with open(path, "wb") as blank:
            blank.write(b"\0" * size)
        with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
            cells = memoryview(mapped).cast("q")
            cells[0], cells[1], cells[2] = _MAGIC, rows, slots
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
            for slot in range(state.slots):
                state.set_in_flight(slot, 0)
            return state
        handle.close()
        raise RuntimeError(f"every row of {path} is taken: more workers than rows")

    def slot(self, engine: str) -> int:
        """The column of `engine`, the same in every worker; taken on first use. RuntimeError
        when the file has no room for another name."""
        slot = self._slot_of.get(engine)
        if slot is None:
            key = _name_key(engine)
            slot = self._find(key)
            if slot is None:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX)
                try:
                    slot = self._find(key)  # another worker may have taken it meanwhile
                    if slot is None:
                        slot = self._take(key, engine)
                finally:
                    fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._slot_of[engine] = slot
        return slot

    def _find(self, key: int) -> int | None:
        cells = self._cells
        for slot in range(self.slots):
            found = cells[_HEADER + slot]
            if found == key:
                return slot
            if found == 0:
                return None
        return None

    def _take(self, key: int, engine: str) -> int:
        for slot in range(self.slots):
            if self._cells[_HEADER + slot] == 0:
                self._cells[_HEADER + slot] = key
                return slot
        raise RuntimeError(f"no room for engine {engine} in {self.path}: {self.slots} engine names were used "
                           f"since start-up; restart the gateway")  # fmt: skip

    def _in_flight_cell(self, row: int, slot: int) -> int:
        return _HEADER + self.slots + row * self.slots + slot

    def set_in_flight(self, slot: int, count: int) -> None:
        self._cells[self._in_flight_cell(self.row, slot)] = count

    def others_in_flight(self, slot: int) -> int:
        """What the other workers have in flight on the engine in column `slot`."""
        cells, start = self._cells, _HEADER + self.slots + slot
        total = sum(cells[start + row * self.slots] for row in range(self.rows))
        return total - cells[self._in_flight_cell(self.row, slot)]

    def mark_ready(self) -> None:
        """This worker serves from now on (a file per row: a restarted worker finds the
        others' marks, and its dead predecessor's, already there)."""
        Path(f"{self.path}.ready{self.row}").touch()

    def num_ready(self) -> int:
        """Workers that have said they serve since the gateway started."""
        return len(list(self.path.parent.glob(f"{self.path.name}.ready*")))

    def _draining_cell(self, slot: int) -> int:
        return _HEADER + self.slots + self.rows * self.slots + slot

    def draining(self, slot: int) -> bool:
        return bool(self._cells[self._draining_cell(slot)])

    def set_draining(self, slot: int, draining: bool) -> None:
        self._cells[self._draining_cell(slot)] = int(draining)

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


def _name_key(engine: str) -> int:
    """A nonzero int64 for the name (64-bit: a collision among ~1000 names is ~1e-13)."""
    return int.from_bytes(xxhash.xxh3_64_digest(engine.encode()), "little", signed=True) or 1
