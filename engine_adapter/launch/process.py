"""What the launchers share: a server started in its own session (so its whole process group
can be stopped, children included) with its output in a log file, asked over HTTP if it is up."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
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


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    """SIGTERM the process group, then SIGKILL it after `timeout_s`: children (an engine's
    EngineCore and workers, a store's workers) may outlive the process that started them."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.error("%s (pid %s) did not exit", what, proc.pid)
