"""What the launchers share: a server started in its own session (so its whole process group
can be stopped, children included) with its output in a log file, asked over HTTP if it is up."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def spawn_logged(
    command: Sequence[str], env: Mapping[str, str], log_path: Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            list(command), env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=preexec_fn,  # noqa: PLW1509
        )  # fmt: skip
    finally:
        log.close()


def answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def log_tail(log_path: Path, num_lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float, what: str, shared: set[str] | None = None) -> None:
    """SIGTERM the process group, then SIGKILL it after `timeout_s`: children (an engine's
    EngineCore and workers, a store's workers) may outlive the process that started them.
    `shared`: the group's shared memory, when read before it was signalled already."""
    if shared is None:
        shared = shared_memory_of_group(proc.pid)
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc, what, shared)


def kill_group(proc: subprocess.Popen[bytes], what: str, shared: set[str] | None = None) -> None:
    """SIGKILL the process group, wait for it to be gone, and remove the shared memory its
    processes mapped (`shared`, else read now) that nothing maps any more: a killed vLLM
    engine leaves its message queues in /dev/shm (160 and 240 MB files, a pair per engine)."""
    if shared is None:
        shared = shared_memory_of_group(proc.pid)
    signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.error("%s (pid %s) did not exit", what, proc.pid)
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    remove_unmapped(shared)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shared_memory_maps(pid: str) -> set[str]:
    found: set[str] = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            at = line.find(" /dev/shm/")
            if at >= 0:
                found.add(line[at + 1 :].rstrip("\n").removesuffix(" (deleted)"))
    return found


def _pids() -> list[str]:
    try:
        return [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:  # no /proc (not Linux): nothing is found, nothing removed
        return []


def shared_memory_of_group(pgid: int) -> set[str]:
    """The /dev/shm files the processes of group `pgid` map (Linux; elsewhere none)."""
    found: set[str] = set()
    for pid in _pids():
        try:
            if os.getpgid(int(pid)) == pgid:
                found |= _shared_memory_maps(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def remove_unmapped(paths: set[str]) -> None:
    """Unlink those of `paths` that no live process maps."""
    if not paths:
        return
    in_use: set[str] = set()
    for pid in _pids():
        try:
            in_use |= _shared_memory_maps(pid) & paths
        except OSError:
            continue
    for path in paths - in_use:
        try:
            os.unlink(path)
        except OSError:
            pass
