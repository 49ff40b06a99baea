"""Shared pieces of the benchmarks: local engines, a gateway subprocess, stats, reports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
REPORT_DIR = ROOT / "bench" / "reports"
LOG_DIR = ROOT / ".cache" / "bench-logs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def gateway_process(config: dict[str, Any], startup_timeout_s: float = 60) -> Iterator[str]:
    """Run `python -m gateway` with `config` in its own process; yields its base URL.

    Its log goes to a file under .cache/bench-logs/: a pipe nobody reads fills up on a long
    run and then blocks the gateway in its next log call."""
    with gateway_subprocess(config, startup_timeout_s) as (url, _):
        yield url


@contextlib.contextmanager
def gateway_subprocess(
    config: dict[str, Any], startup_timeout_s: float = 60, cpus: Collection[int] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`gateway_process` that also yields the process (for CPU accounting) and, with `cpus`,
    pins it (and every process or thread it starts later) to those CPU cores."""
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"gateway-{port}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", handle.name],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    if cpus is not None:
        os.sched_setaffinity(proc.pid, set(cpus))  # inherited by the threads and workers it starts
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = log_path.read_text(errors="replace")
                raise RuntimeError(f"gateway did not start (log {log_path}):\n{err[-2000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(handle.name)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, title: str, body: str, directory: Path | None = None) -> Path:
    directory = directory or REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(f"# {title}\n\n{body}\n")
    return path


async def read_event_stream(resp: httpx.Response, start: float) -> tuple[float | None, dict[str, Any]]:
    """Read an OpenAI server-sent-events answer to its end: the time from `start` to its first
    choice (None if it had none) and its usage (`stream_options.include_usage`; {} without)."""
    ttft: float | None = None
    usage: dict[str, Any] = {}
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if ttft is None and event.get("choices"):
            ttft = time.perf_counter() - start
        usage = event.get("usage") or usage
    return ttft, usage
