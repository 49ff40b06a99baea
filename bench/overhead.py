"""What a router adds on top of the engines, measured against engines that cost nothing.

    python -m bench.overhead [--quick] [--policies prefix,round_robin] [--workers 1,2]
                             [--engines 2] [--rates 100,200,500] [--target http://127.0.0.1:8080]

Starts `--engines` fake vLLM servers (`bench/fake_engine.py`: answers in microseconds, real
/tokenize), then measures, in one run and side by side:

- `direct`: the fake engines themselves (the client spreads requests over them);
- the gateway once per routing policy (`--policies`) and worker count (`--workers`; the YAML
  key `server.workers: N` is written only when N > 1), each a fresh `python -m gateway`;
- any `--target URL`: another router you run, pointed at the same fake engines (give them
  fixed ports with `--engine-base-port 8101`: engines listen on 8101, 8102, ...).

CPU pinning (Linux, two cores or more; `--no-pin` to leave it to the scheduler): this process
(the load generator) and the fake engines share the first core; the gateway gets the second
(with `--workers N > 1`, the next N cores, or all cores when there are not that many). An
external `--target` is not pinned.

Phases, each bounded in count and time:

1. sequential: `--requests` chats one at a time, per workload: ~2k and ~16k-token prompts
   (`--prompt-tokens`), each "cold" (a fresh system prompt every request) or "repeat" (each
   request extends an earlier conversation of the same session by one turn; the sessions'
   first turns are sent, unmeasured, before, then `TURN_GAP_S` of pause, as a user reads an
   answer before the next turn). The same request goes direct and through the
   router, alternating which goes first, so both see the same noise; added = percentile
   (router) - percentile (direct).
2. open loop: Poisson arrivals at each of `--rates` for `--duration` s (at most
   `--max-requests`), ~2k-token chats of which half extend an earlier conversation of the
   phase. Latency counts from the send (waiting for one of the client's 512 connections
   included); the client's own lateness against the schedule is reported apart. Errors: any non-200, connection errors, timeouts (`--timeout`).
   A rate with more than 20 % errors ends the sweep for that target.
3. search: up to `--search-steps` more rates bisecting between the highest clean rate and the
   lowest unclean one. Clean: no errors, p99 < `--p99-limit-ms`, and at least 90 % of the
   offered rate completed. The highest clean rate reported is the highest clean rate below the
   lowest unclean one.
4. overload (routers only): one more phase at `--overload-rate`, past what a router carries,
   its connections opened by the client's pool as it needs them (16 beforehand, as in every
   open-loop phase). What the router must do there: refuse the excess at once (429 or 503),
   answer what it admits within `--p99-limit-ms` (p99), and lose nothing (no timeout, no
   dropped connection).

The client (`bench.client`) is the gateway's own lean HTTP/1.1 pool, at ~0.1 ms of CPU per
request: on two cores it shares one with what it measures.

During every phase a `GET /health` probe every 20 ms measures the router's event-loop lag
(p99), next to the same probe against the idle fake engine. CPU: user+system seconds of the
router's process tree (psutil, children included) over the phase, minus its idle rate (health
checks, the probe) measured for `--idle-s` before, per request sent to it.

Output: a markdown table on stdout, progress on stderr, and bench/reports/overhead-*.md with
the tables and a PNG of p50/p99 latency vs offered rate per target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.client import Client
from bench.common import LOG_DIR, REPORT_DIR, ROOT, free_port, gateway_subprocess, markdown_table, median, percentile, write_report

CHAT_PATH = "/v1/chat/completions"
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di", "fa", "gu"]
# Policies whose scorers read no prompt: the gateway never tokenizes for them.
PROMPTLESS_POLICIES = frozenset({"round_robin", "least_loaded", "session"})
PROBE_INTERVAL_S = 0.02
# Between a conversation's first turn and the next: a real next turn waits for the answer and
# for its user (seconds); the gateway's idle-time work on the first turn (caching its pieces
# for the next, gateway.tokenization) gets idle time meanwhile, as it would.
TURN_GAP_S = 1.0
# An open-loop phase whose client sent this late (p99, ms) measured the machine, not the
# target: it is run once more and the less disturbed run kept.
CLIENT_LAG_LIMIT_MS = 20.0


def log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested)
# ---------------------------------------------------------------------------------------------


def poisson_arrivals(rate_per_s: float, duration_s: float, max_count: int, rng: random.Random) -> list[float]:
    """Arrival times (s from the start) of a Poisson process of `rate_per_s`, all before
    `duration_s`, at most `max_count` of them."""
    if rate_per_s <= 0 or duration_s <= 0 or max_count <= 0:
        return []
    times: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s and len(times) < max_count:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


@dataclass
class RatePoint:
    """One open-loop phase at one offered rate."""

    offered: float  # req/s asked for
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # "429", "503", "timeout", "conn"...
    p50_ms: float = float("nan")  # successful requests, from the send
    p99_ms: float = float("nan")
    error_p50_ms: float = float("nan")  # how fast the refusals came
    realized: float = 0.0  # sent / last arrival time (Poisson noise around `offered`)
    achieved: float = 0.0  # successes / time from start to the last completion
    cpu_ms_per_request: float | None = None
    probe_p99_ms: float = float("nan")
    client_lag_p99_ms: float = float("nan")  # scheduled arrival -> send; the client's own lateness
    others_cores: float = float("nan")  # CPU other users' processes took meanwhile (OthersMeter)
    skipped: bool = False


def is_clean(point: RatePoint, p99_limit_ms: float = 100.0, min_completed: float = 0.9) -> bool:
    """No errors, p99 under the limit, and the rate was actually carried."""
    if point.skipped or point.sent == 0 or point.errors:
        return False
    if not point.p99_ms < p99_limit_ms:  # NaN is not clean
        return False
    return point.achieved >= min_completed * (point.realized or point.offered)


def highest_clean_rate(points: Sequence[RatePoint], p99_limit_ms: float = 100.0) -> float | None:
    """The highest clean offered rate below the lowest unclean one (a clean result above a
    failure is luck, not capacity). None when nothing below the first failure was clean."""
    tried = [p for p in points if not p.skipped]
    failing = [p.offered for p in tried if not is_clean(p, p99_limit_ms)]
    ceiling = min(failing) if failing else math.inf
    clean = [p.offered for p in tried if is_clean(p, p99_limit_ms) and p.offered < ceiling]
    return max(clean) if clean else None


def next_search_rate(points: Sequence[RatePoint], p99_limit_ms: float = 100.0, min_ratio: float = 1.15,
                     min_rate: float = 10.0) -> float | None:  # fmt: skip
    """The next rate to try, bisecting between the highest clean rate and the lowest unclean
    one; None when every rate tried was clean (no ceiling seen) or the bracket is tight."""
    tried = [p for p in points if not p.skipped]
    failing = [p.offered for p in tried if not is_clean(p, p99_limit_ms)]
    if not failing:
        return None
    high = min(failing)
    low = highest_clean_rate(tried, p99_limit_ms) or 0.0
    if low > 0 and high / low < min_ratio:
        return None
    rate = float(round((low + high) / 2 if low > 0 else high / 2))
    if rate < min_rate or rate in {p.offered for p in tried}:
        return None
    return rate


def clean_rate_label(points: Sequence[RatePoint], p99_limit_ms: float = 100.0) -> str:
    tried = [p for p in points if not p.skipped]
    if not tried:
        return "-"
    best = highest_clean_rate(tried, p99_limit_ms)
    if all(is_clean(p, p99_limit_ms) for p in tried):
        return f">={max(p.offered for p in tried):g}"
    if best is None:
        return f"<{min(p.offered for p in tried):g}"
    return f"{best:g}"


def chat_body(model: str, messages: list[dict[str, str]], stream: bool = False, max_tokens: int = 3) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


Words = Callable[[random.Random, int], str]  # (rng, about this many tokens) -> text


def syllable_vocab(seed: int = 0, size: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(size)]


def make_words(vocab: Sequence[str], tokens_per_word: float) -> Words:
    def words(rng: random.Random, tokens: int) -> str:
        return " ".join(rng.choices(vocab, k=max(1, round(tokens / tokens_per_word))))

    return words


def _opening(words: Words, rng: random.Random, tokens: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": words(rng, max(1, tokens - 60))},
            {"role": "user", "content": words(rng, 40)}]  # fmt: skip


def _next_turn(words: Words, rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": words(rng, 30)}, {"role": "user", "content": words(rng, 30)}]


def cold_requests(words: Words, model: str, count: int, tokens: int, seed: int, stream: bool = False) -> list[bytes]:
    """`count` chats of about `tokens` tokens, each with a system prompt never seen before."""
    rng = random.Random(seed)
    return [chat_body(model, _opening(words, rng, tokens), stream) for _ in range(count)]


def repeat_requests(words: Words, model: str, count: int, tokens: int, seed: int, turns: int = 4,
                    stream: bool = False) -> tuple[list[bytes], list[bytes]]:  # fmt: skip
    """(warm-up, measured): ceil(count / turns) conversations of about `tokens` tokens; the
    warm-up list is each one's first turn, the measured list extends them turn by turn,
    round-robin over the sessions, so each measured request's earlier turns were sent before."""
    rng = random.Random(seed)
    sessions = [_opening(words, rng, tokens) for _ in range(max(1, math.ceil(count / turns)))]
    warm = [chat_body(model, s, stream) for s in sessions]
    measured: list[bytes] = []
    while len(measured) < count:
        for messages in sessions:
            if len(measured) >= count:
                break
            messages.extend(_next_turn(words, rng))
            measured.append(chat_body(model, messages, stream))
    return warm, measured


def mixed_schedule(words: Words, model: str, rate_per_s: float, duration_s: float, max_count: int, tokens: int,
                   seed: int, repeat_fraction: float = 0.5, active_sessions: int = 32, max_turns: int = 8,
                   stream: bool = False) -> list[tuple[float, bytes, bool]]:  # fmt: skip
    """Open-loop arrivals (time, body, is_repeat): a new conversation of about `tokens` tokens,
    or (with probability `repeat_fraction`) the next turn of one of the `active_sessions`
    most recent conversations of the schedule."""
    rng = random.Random(seed)
    sessions: list[list[dict[str, str]]] = []
    schedule = []
    for at in poisson_arrivals(rate_per_s, duration_s, max_count, rng):
        recent = [s for s in sessions[-active_sessions:] if len(s) < 2 + 2 * max_turns]
        if recent and rng.random() < repeat_fraction:
            messages = rng.choice(recent)
            messages.extend(_next_turn(words, rng))
            schedule.append((at, chat_body(model, messages, stream), True))
        else:
            messages = _opening(words, rng, tokens)
            sessions.append(messages)
            schedule.append((at, chat_body(model, messages, stream), False))
    return schedule


def tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


# ---------------------------------------------------------------------------------------------
# Processes: fake engines, CPU accounting, pinning
# ---------------------------------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def fake_engines(count: int, model: str, tokenizer_dir: str, base_port: int = 0,
                 timeout_s: float = 90) -> Iterator[tuple[list[str], list[int]]]:  # fmt: skip
    """Start `count` fake engines (each its own process, inheriting this process's CPU
    affinity); yields their URLs and pids; stops them on the way out, whatever happens."""
    import httpx

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for i in range(count):
            port = base_port + i if base_port else free_port()
            with (LOG_DIR / f"fake-engine-{port}.log").open("wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.fake_engine", "--port", str(port), "--model", model,
                     "--tokenizer", tokenizer_dir],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                ))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout_s
        for url, proc in zip(urls, procs):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake engine {url} did not start; see {LOG_DIR}/fake-engine-*.log")
                time.sleep(0.1)
        yield urls, [p.pid for p in procs]
    finally:
        for proc in procs:
            _stop_process(proc)


def _process_cpu_seconds(proc: Any) -> float:
    """CPU seconds (user+system) of one live process: the sum of its threads' scheduler run
    time (/proc/PID/task/*/schedstat, nanoseconds) where Linux has it, psutil's clock-tick
    counters (10 ms steps: too coarse for a few dozen requests) otherwise."""
    try:
        total_ns = 0
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as handle:
                total_ns += int(handle.read().split()[0])
        return total_ns / 1e9
    except (OSError, ValueError, IndexError):
        t = proc.cpu_times()
        return float(t.user + t.system)


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """user+system CPU seconds of these processes and all their descendants (live ones, and
    the ones already reaped by their parent)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            t = root.cpu_times()
            total += _process_cpu_seconds(root) + t.children_user + t.children_system
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error, OSError):
                    total += _process_cpu_seconds(child)
        except psutil.Error:
            continue
    return total


def listening_pid(url: str) -> int | None:
    """The pid of the local process listening on the URL's port (for CPU accounting of an
    external router), when this user may see it."""
    import psutil

    port = urlsplit(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except (psutil.Error, OSError):
        pass
    return None


class OthersMeter:
    """CPU the rest of the machine used meanwhile (other users' work on a shared host): all
    cores' busy time minus this process tree's (load generator, fake engines, gateways) and
    any external router's. In cores; a number near 0 means the measurement had the machine."""

    def __init__(self, extra_pids: Sequence[int] = ()) -> None:
        self._pids = [os.getpid(), *extra_pids]
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        import psutil

        busy = sum(c.user + c.nice + c.system + getattr(c, "irq", 0.0) + getattr(c, "softirq", 0.0)
                   for c in psutil.cpu_times(percpu=True))  # fmt: skip
        return time.perf_counter(), busy, tree_cpu_seconds(self._pids)

    def cores(self) -> float:
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = self._read()
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(1e-9, t1 - t0)


def plan_cpus(available: Iterable[int], workers: int) -> tuple[set[int] | None, set[int] | None]:
    """(load generator + fake engines, router) cores; (None, None) with fewer than two."""
    cpus = sorted(available)
    if len(cpus) < 2:
        return None, None
    if workers <= 1:
        return {cpus[0]}, {cpus[1]}
    return {cpus[0]}, set(cpus[1 : 1 + workers]) if len(cpus) >= workers + 1 else set(cpus)


# ---------------------------------------------------------------------------------------------
# Phases (the client: bench.client)
# ---------------------------------------------------------------------------------------------


class Probe:
    """`GET /health` every 20 ms, one at a time on its own connection, while a phase runs."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.samples_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def __aenter__(self) -> Probe:
        if self.url is not None:
            self._task = asyncio.create_task(self._run(self.url))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        if self._task is not None:
            await self._task

    async def _run(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        async with Client(max_connections=1) as client:
            due = loop.time()
            while not self._stop:
                _, seconds = await client.get(url, "/health", 1.0)
                self.samples_ms.append(seconds * 1000)
                due = max(due + PROBE_INTERVAL_S, loop.time())
                await asyncio.sleep(max(0.0, due - loop.time()))

    @property
    def p99_ms(self) -> float:
        return percentile(self.samples_ms, 99)


@dataclass
class SequentialResult:
    direct_ms: list[float] = field(default_factory=list)
    target_ms: list[float] = field(default_factory=list)
    errors: int = 0
    target_requests: int = 0  # measured + warm-up requests sent to the target
    probe_p99_ms: float = float("nan")
    wall_s: float = 0.0
    others_cores: float = float("nan")  # CPU other users' processes took meanwhile


async def sequential_phase(direct_urls: Sequence[str], target_url: str | None, warm: Sequence[bytes],
                           bodies: Sequence[bytes], warm_up: bytes, timeout_s: float, max_s: float,
                           probe_url: str | None) -> SequentialResult:  # fmt: skip
    """Each body once direct (round-robin over the engines) and once via the target, one at a
    time, alternating which goes first. Without a target: direct only. Bounded by `max_s`."""
    result = SequentialResult()
    started = time.perf_counter()
    async with Client(max_connections=8) as client:
        for _ in range(3):  # connections and first-request paths, with a prompt used nowhere else
            for url in [*direct_urls, *([target_url] if target_url else [])]:
                await client.post(url, CHAT_PATH, warm_up, timeout_s)
        async with Probe(probe_url) as probe:
            for body in warm:
                status, _ = await client.post(target_url or direct_urls[0], CHAT_PATH, body, timeout_s)
                result.target_requests += 1 if target_url else 0
                result.errors += status != "200"
            if warm:
                await asyncio.sleep(TURN_GAP_S)
            for i, body in enumerate(bodies):
                if time.perf_counter() - started > max_s:
                    log(f"    sequential phase stopped at its time bound ({max_s:.0f} s) after {i} requests")
                    break
                legs = [("direct", direct_urls[i % len(direct_urls)])]
                if target_url:
                    legs.append(("target", target_url))
                    if i % 2:
                        legs.reverse()
                for leg, url in legs:
                    status, seconds = await client.post(url, CHAT_PATH, body, timeout_s)
                    if status != "200":
                        result.errors += 1
                        continue
                    (result.direct_ms if leg == "direct" else result.target_ms).append(seconds * 1000)
                result.target_requests += 1 if target_url else 0
        result.probe_p99_ms = probe.p99_ms
    result.wall_s = time.perf_counter() - started
    return result


async def open_loop_phase(urls: Sequence[str], schedule: Sequence[tuple[float, bytes, bool]], offered: float,
                          timeout_s: float, probe_url: str | None) -> RatePoint:  # fmt: skip
    """Send each body at its scheduled time (round-robin over `urls`) without waiting for the
    earlier ones. Latency counts from the send (a wait for a pooled connection included); how
    late the client sent is reported apart, as its own lag."""
    point = RatePoint(offered=offered, sent=len(schedule))
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    error_latencies: list[float] = []
    lags: list[float] = []  # how late the client sent each request (its own CPU, timer resolution)
    done_at = [0.0]

    async with Client(max_connections=512) as client:
        await client.open_connections(urls, 16 // len(urls) or 1)
        start = loop.time() + 0.05

        async def one(url: str, body: bytes, due: float) -> None:
            lags.append((loop.time() - due) * 1000)
            status, seconds = await client.post(url, CHAT_PATH, body, timeout_s)
            done_at[0] = max(done_at[0], loop.time() - start)
            if status == "200":
                latencies.append(seconds * 1000)
            else:
                point.errors += 1
                point.error_kinds[status] = point.error_kinds.get(status, 0) + 1
                error_latencies.append(seconds * 1000)

        async with Probe(probe_url) as probe:
            tasks = []
            for i, (at, body, _) in enumerate(schedule):
                due = start + at
                delay = due - loop.time()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(urls[i % len(urls)], body, due)))
            await asyncio.gather(*tasks)  # each bounded by its timeout
        point.probe_p99_ms = probe.p99_ms
    point.ok = len(latencies)
    point.p50_ms, point.p99_ms = median(latencies), percentile(latencies, 99)
    point.error_p50_ms = median(error_latencies)
    point.client_lag_p99_ms = percentile(lags, 99)
    point.realized = len(schedule) / schedule[-1][0] if schedule and schedule[-1][0] > 0 else offered
    point.achieved = point.ok / done_at[0] if done_at[0] > 0 else 0.0
    return point


async def idle_probe(url: str, seconds: float) -> float:
    async with Probe(url) as probe:
        await asyncio.sleep(seconds)
    return probe.p99_ms


def run_loop(coro: Any) -> Any:
    """Run one phase on uvloop (when installed), the garbage collector paused: a collection
    pass in the client would show up as latency of whatever it was timing."""
    from bench.fake_engine import run_loop as run

    gc.collect()
    gc.disable()
    try:
        return run(coro)
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# Targets and the run
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    kind: str  # direct | gateway | external
    urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # for CPU accounting; empty: unknown
    idle_cpu_per_s: float = 0.0
    idle_probe_p99_ms: float = float("nan")
    seq: dict[str, SequentialResult] = field(default_factory=dict)
    seq_cpu_ms: dict[str, float | None] = field(default_factory=dict)
    points: list[RatePoint] = field(default_factory=list)
    overload: RatePoint | None = None  # the overload phase (routers only)
    error: str | None = None

    @property
    def probe_url(self) -> str:
        """The base URL the probe's `GET /health` goes to."""
        return self.urls[0]


@dataclass
class Plan:
    model: str
    stream: bool
    requests: int
    prompt_tokens: list[int]
    rates: list[float]
    duration_s: float
    max_requests: int
    timeout_s: float
    seq_timeout_s: float
    seq_max_s: float
    search_steps: int
    p99_limit_ms: float
    idle_s: float
    words: Words
    seq_probe: bool = True
    seed: int = 1
    overload_rate: float = 0.0  # 0: no overload phase


def _cpu_ms_per_request(target: Target, before: float, wall_s: float, requests: int) -> float | None:
    if not target.pids or requests <= 0:
        return None
    used = tree_cpu_seconds(target.pids) - before - target.idle_cpu_per_s * wall_s
    return max(0.0, used) * 1000 / requests


def settle(target: Target, max_s: float = 10.0) -> None:
    """Wait for the target to finish what it still works on (a backlog after an overload)."""
    if not target.pids:
        time.sleep(1.0)
        return
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(target.pids)
        time.sleep(0.3)
        if (tree_cpu_seconds(target.pids) - before) / 0.3 < max(0.15, 2 * target.idle_cpu_per_s):
            return


def calibrate_idle(target: Target, seconds: float) -> None:
    """The target's CPU rate and probe latency with nothing but the probe running."""
    before = tree_cpu_seconds(target.pids) if target.pids else 0.0
    started = time.perf_counter()
    target.idle_probe_p99_ms = run_loop(idle_probe(target.probe_url, seconds))
    if target.pids:
        target.idle_cpu_per_s = (tree_cpu_seconds(target.pids) - before) / (time.perf_counter() - started)


def seq_workloads(plan: Plan) -> list[tuple[str, list[bytes], list[bytes]]]:
    """(name, warm-up, measured) per sequential workload; the same bodies for every target."""
    out: list[tuple[str, list[bytes], list[bytes]]] = []
    for tokens in plan.prompt_tokens:
        label = tokens_label(tokens)
        seed = plan.seed * 1000 + tokens
        out.append((f"{label} cold", [], cold_requests(plan.words, plan.model, plan.requests, tokens, seed, plan.stream)))
        warm, measured = repeat_requests(plan.words, plan.model, plan.requests, tokens, seed + 1, stream=plan.stream)
        out.append((f"{label} repeat", warm, measured))
    return out


def measure_sequential(plan: Plan, target: Target, direct: Target, workloads: list[tuple[str, list[bytes], list[bytes]]],
                       warm_up: bytes) -> None:  # fmt: skip
    is_direct = target is direct
    for name, warm, bodies in workloads:
        settle(target, max_s=5)
        before = tree_cpu_seconds(target.pids) if target.pids else 0.0
        others = OthersMeter(target.pids if target.kind == "external" else ())
        result = run_loop(sequential_phase(
            direct.urls, None if is_direct else target.urls[0], warm, bodies, warm_up,
            plan.seq_timeout_s, plan.seq_max_s, target.probe_url if plan.seq_probe else None,
        ))  # fmt: skip
        handled = len(warm) + len(result.direct_ms) if is_direct else result.target_requests
        target.seq[name] = result
        target.seq_cpu_ms[name] = _cpu_ms_per_request(target, before, result.wall_s, handled)
        result.others_cores = others.cores()
        mine = result.direct_ms if is_direct else result.target_ms
        log(f"  {target.name} {name}: p50 {median(mine):.2f} ms p99 {percentile(mine, 99):.2f} ms"
            + ("" if is_direct else f" (direct p50 {median(result.direct_ms):.2f} ms)")
            + f", {result.errors} errors, probe p99 {result.probe_p99_ms:.1f} ms, others {result.others_cores:.2f} cores")  # fmt: skip


def measure_open_loop(plan: Plan, target: Target, tokens: int) -> None:
    def run_rate(rate: float) -> RatePoint:
        schedule = mixed_schedule(plan.words, plan.model, rate, plan.duration_s, plan.max_requests, tokens,
                                  seed=plan.seed * 7919 + int(rate), stream=plan.stream)  # fmt: skip
        point: RatePoint | None = None
        for attempt in range(2):
            settle(target)
            before = tree_cpu_seconds(target.pids) if target.pids else 0.0
            others = OthersMeter(target.pids if target.kind == "external" else ())
            started = time.perf_counter()
            again: RatePoint = run_loop(open_loop_phase(target.urls, schedule, rate, plan.timeout_s, target.probe_url))
            again.cpu_ms_per_request = _cpu_ms_per_request(target, before, time.perf_counter() - started, again.sent)
            again.others_cores = others.cores()
            if point is None or again.client_lag_p99_ms < point.client_lag_p99_ms:
                point = again
            if not point.client_lag_p99_ms > CLIENT_LAG_LIMIT_MS:
                break
            if attempt == 0:
                log(f"  {target.name} open loop {rate:g}/s: the client itself sent late (lag p99 "
                    f"{point.client_lag_p99_ms:.0f} ms: a busy machine); once more")  # fmt: skip
        assert point is not None
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(point.error_kinds.items()))
        log(f"  {target.name} open loop {rate:g}/s: sent {point.sent}, achieved {point.achieved:.0f}/s, "
            f"p50 {point.p50_ms:.1f} ms p99 {point.p99_ms:.1f} ms, errors {point.errors}"
            + (f" ({kinds})" if kinds else "") + f", probe p99 {point.probe_p99_ms:.1f} ms"
            + f", others {point.others_cores:.2f} cores"
            + ("" if is_clean(point, plan.p99_limit_ms) else "  [not clean]"))  # fmt: skip
        return point

    overloaded = False
    for rate in sorted(plan.rates):
        if overloaded:
            target.points.append(RatePoint(offered=rate, skipped=True))
            continue
        point = run_rate(rate)
        target.points.append(point)
        overloaded = point.sent > 0 and point.errors > 0.2 * point.sent
    for _ in range(plan.search_steps):
        search = next_search_rate(target.points, plan.p99_limit_ms)
        if search is None:
            break
        target.points.append(run_rate(search))
    target.points.sort(key=lambda p: p.offered)
    if plan.overload_rate > 0 and target.kind != "direct":
        target.overload = run_rate(plan.overload_rate)


def wait_gateway_ready(url: str, model: str, policy: str, timeout_s: float = 20) -> None:
    """Until /health is ok and, for prefix policies, the gateway tokenizes locally (before its
    tokenizer check passes it asks the engines, which is not what is measured here)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                if policy in PROMPTLESS_POLICIES:
                    return
                metrics = httpx.get(f"{url}/metrics", timeout=2).text
                if f'gateway_tokenizer_ready{{model="{model}"}} 1.0' in metrics:
                    return
        time.sleep(0.2)
    log(f"  warning: gateway {url} not fully ready after {timeout_s:.0f} s (tokenizer check?); measuring anyway")


def wait_external_ready(url: str, timeout_s: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer GET /v1/models with 200 within {timeout_s:.0f} s")


def gateway_config(engine_urls: Sequence[str], model: str, tokenizer_dir: str, policy: str, workers: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "engines": [{"name": f"fake-{i}", "url": url} for i, url in enumerate(engine_urls)],
        "models": [{"name": model, "tokenizer": tokenizer_dir}],
        "routing": {"policy": policy},
    }
    if workers > 1:
        config["server"] = {"workers": workers}
    return config


def measure_target(plan: Plan, target: Target, direct: Target, workloads: list[tuple[str, list[bytes], list[bytes]]],
                   warm_up: bytes) -> None:  # fmt: skip
    calibrate_idle(target, plan.idle_s)
    log(f"  {target.name}: idle probe p99 {target.idle_probe_p99_ms:.2f} ms, idle CPU "
        f"{target.idle_cpu_per_s * 1000:.1f} ms/s")  # fmt: skip
    measure_sequential(plan, target, direct, workloads, warm_up)
    measure_open_loop(plan, target, plan.prompt_tokens[0])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _ref_point(points: Sequence[RatePoint], ref_rate: float) -> RatePoint | None:
    tried = [p for p in points if not p.skipped and p.ok]
    exact = [p for p in tried if p.offered == ref_rate]
    if exact:
        return exact[0]
    return min(tried, key=lambda p: abs(p.offered - ref_rate), default=None)


def summary_rows(targets: Sequence[Target], direct: Target, plan: Plan, ref_rate: float) -> list[list[str]]:
    rows = []
    for target in targets:
        if target.error:
            rows.append([target.name, "(failed)", "-", "-", "-", "-", "-", "-", "-", target.error[:80]])
            continue
        for name, result in target.seq.items():
            mine = result.direct_ms if target is direct else result.target_ms
            base = result.direct_ms
            p50, p99 = median(mine), percentile(mine, 99)
            added50 = 0.0 if target is direct else p50 - median(base)
            added99 = 0.0 if target is direct else p99 - percentile(base, 99)
            rows.append([target.name, f"seq {name}", _fmt(p50), _fmt(p99), _fmt(added50), _fmt(added99),
                         _fmt(target.seq_cpu_ms.get(name)), "", _fmt(result.probe_p99_ms, 1),
                         _fmt(result.others_cores)])  # fmt: skip
        ref = _ref_point(target.points, ref_rate)
        base_ref = _ref_point(direct.points, ref.offered) if ref else None
        if ref is not None:
            added50 = ref.p50_ms - base_ref.p50_ms if base_ref else float("nan")
            added99 = ref.p99_ms - base_ref.p99_ms if base_ref else float("nan")
            rows.append([target.name, f"open {tokens_label(plan.prompt_tokens[0])} mixed @{ref.offered:g}/s",
                         _fmt(ref.p50_ms), _fmt(ref.p99_ms), _fmt(added50), _fmt(added99),
                         _fmt(ref.cpu_ms_per_request), clean_rate_label(target.points, plan.p99_limit_ms),
                         _fmt(ref.probe_p99_ms, 1), _fmt(ref.others_cores)])  # fmt: skip
    return rows


def open_loop_rows(targets: Sequence[Target], plan: Plan) -> list[list[str]]:
    rows = []
    for target in targets:
        for p in [*target.points, *([target.overload] if target.overload else [])]:
            if p.skipped:
                rows.append([target.name, f"{p.offered:g}", "skipped (a lower rate was overloaded)", "", "", "", "", "", "", "", "", ""])
                continue
            kinds = " ".join(f"{k}:{v}" for k, v in sorted(p.error_kinds.items()))
            offered = f"{p.offered:g}" + (" (overload)" if p is target.overload else "")
            rows.append([target.name, offered, str(p.sent), _fmt(p.achieved, 0), _fmt(p.p50_ms),
                         _fmt(p.p99_ms), f"{p.errors} {kinds}".strip(), _fmt(p.error_p50_ms, 1),
                         _fmt(p.cpu_ms_per_request), _fmt(p.client_lag_p99_ms, 1), _fmt(p.others_cores),
                         _fmt(p.probe_p99_ms, 1) + (" ok" if is_clean(p, plan.p99_limit_ms) else " x")])  # fmt: skip
    return rows


REFUSALS = ("429", "503")  # what admission control answers with, Retry-After included


def overload_checks(point: RatePoint, p99_limit_ms: float) -> list[tuple[str, str, str, bool]]:
    """(measure, value, goal, met) for a phase past capacity: what is admitted is answered in
    time, and every other request is refused, none lost (timed out, reset, answered 5xx)."""
    lost = sum(n for kind, n in point.error_kinds.items() if kind not in REFUSALS)
    where = f"overload @{point.offered:g}/s"
    return [
        (f"{where}: admitted p99 (ms)", _fmt(point.p99_ms), f"<= {p99_limit_ms:g}", point.p99_ms <= p99_limit_ms),
        (f"{where}: requests neither answered nor refused", str(lost), "0", lost == 0),
    ]


def verdict_rows(targets: Sequence[Target], direct: Target, plan: Plan) -> list[list[str]]:
    """The issue's goals, per router."""
    rows = []
    small, large = tokens_label(plan.prompt_tokens[0]), tokens_label(plan.prompt_tokens[-1])

    def added(target: Target, name: str, q: float) -> float:
        r = target.seq.get(name)
        if r is None or not r.target_ms:
            return float("nan")
        if q == 50:
            return median(r.target_ms) - median(r.direct_ms)
        return percentile(r.target_ms, q) - percentile(r.direct_ms, q)

    for t in targets:
        if t is direct or t.error:
            continue
        checks: list[tuple[str, float, float]] = [
            (f"added p50, seq {small} cold (ms)", added(t, f"{small} cold", 50), 1.0),
            (f"added p50, seq {small} repeat (ms)", added(t, f"{small} repeat", 50), 1.0),
        ]
        ref, base = _ref_point(t.points, 200), _ref_point(direct.points, 200)
        if ref is not None and base is not None and ref.offered == 200 == base.offered:
            checks.append(("added p99, open loop @200/s (ms)", ref.p99_ms - base.p99_ms, 5.0))
        if large != small:
            checks.append((f"added p50, seq {large} repeat (ms)", added(t, f"{large} repeat", 50), 2.0))
            checks.append((f"added p50, seq {large} cold (ms)", added(t, f"{large} cold", 50), 8.0))
            cold = t.seq.get(f"{large} cold")
            checks.append((f"probe p99 during seq {large} cold (ms)", cold.probe_p99_ms if cold else float("nan"), 5.0))
        best = highest_clean_rate(t.points, plan.p99_limit_ms) or 0.0
        for label, value, goal in checks:
            rows.append([t.name, label, _fmt(value), f"<= {goal:g}", "PASS" if value <= goal else "FAIL"])
        rows.append([t.name, "highest clean rate (req/s)", clean_rate_label(t.points, plan.p99_limit_ms), ">= 500",
                     "PASS" if best >= 500 else "FAIL"])  # fmt: skip
        if t.overload is not None and t.overload.sent:
            for label, shown, wanted, met in overload_checks(t.overload, plan.p99_limit_ms):
                rows.append([t.name, label, shown, wanted, "PASS" if met else "FAIL"])
    return rows


def plot(targets: Sequence[Target], path: Path, p99_limit_ms: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, target in enumerate(t for t in targets if t.points):
        points = [p for p in target.points if not p.skipped and p.ok]
        if not points:
            continue
        color = f"C{i}"
        rates = [p.offered for p in points]
        ax.plot(rates, [p.p99_ms for p in points], "-o", color=color, label=f"{target.name} p99")
        ax.plot(rates, [p.p50_ms for p in points], "--", color=color, alpha=0.7, label=f"{target.name} p50")
        bad = [p for p in points if p.errors]
        if bad:
            ax.plot([p.offered for p in bad], [p.p99_ms for p in bad], "x", color=color, markersize=12)
    ax.axhline(p99_limit_ms, color="grey", linestyle=":", label=f"p99 limit {p99_limit_ms:g} ms")
    ax.set_xlabel("offered rate (req/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Open loop, ~2k-token chats, half repeating (x: errors)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few seconds per phase (20 requests, 2 s rates)")
    parser.add_argument("--policies", default="prefix,round_robin", help="gateway routing presets, comma-separated ('' for none)")
    parser.add_argument("--workers", default="1", help="gateway worker counts, comma-separated (server.workers)")
    parser.add_argument("--target", action="append", default=[], help="another router's base URL (repeatable)")
    parser.add_argument("--engines", type=int, default=2, help="fake engines (each its own process)")
    parser.add_argument("--engine-base-port", type=int, default=0, help="fake engines on this port and up (default: free ports)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--requests", type=int, help="sequential requests per workload (default 100; quick 20)")
    parser.add_argument("--prompt-tokens", default="2048,16384", help="sequential prompt sizes; the first is the open-loop size")
    parser.add_argument("--rates", default="100,200,500", help="open-loop rates, req/s")
    parser.add_argument("--duration", type=float, help="seconds per open-loop rate (default 5; quick 2)")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests per open-loop rate at most")
    parser.add_argument("--search-steps", type=int, help="extra rates bisecting to the highest clean one (default 2; quick 1)")
    parser.add_argument("--timeout", type=float, default=2.0, help="open-loop request timeout, s (counts as an error)")
    parser.add_argument("--overload-rate", type=float, default=2000.0,
                        help="req/s of the overload phase, past the routers' capacity (0: none)")
    parser.add_argument("--p99-limit-ms", type=float, default=100.0)
    parser.add_argument("--ref-rate", type=float, default=200.0, help="open-loop rate shown in the summary table")
    parser.add_argument("--stream", action="store_true", help="streamed chats (latency to the last byte)")
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the scheduler")
    parser.add_argument("--no-seq-probe", action="store_true",
                        help="no /health probe during the sequential phases (it can overlap a measured request)")
    parser.add_argument("--no-report", action="store_true", help="print only; no file under bench/reports")
    args = parser.parse_args(argv)
    args.requests = args.requests or (20 if args.quick else 100)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.search_steps = args.search_steps if args.search_steps is not None else (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        print(run(args))
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def run(args: argparse.Namespace) -> str:
    from bench.fake_engine import default_tokenizer_dir
    from gateway.tokenization.prompt import TextPrompt
    from gateway.tokenization.tokenizer import HFPromptTokenizer

    started = time.monotonic()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    workers_list = _ints(args.workers) or [1]
    tokenizer_dir = default_tokenizer_dir()
    tokenizer = HFPromptTokenizer(tokenizer_dir, local_files_only=True)
    vocab = syllable_vocab()
    sample = " ".join(random.Random(0).choices(vocab, k=4000))
    tokens_per_word = (len(tokenizer.encode(TextPrompt(sample))) - 1) / 4000
    plan = Plan(
        model=args.model, stream=args.stream, requests=args.requests, prompt_tokens=_ints(args.prompt_tokens),
        rates=_floats(args.rates), duration_s=args.duration, max_requests=args.max_requests, timeout_s=args.timeout,
        seq_timeout_s=30.0, seq_max_s=60.0 if not args.quick else 20.0, search_steps=args.search_steps,
        seq_probe=not args.no_seq_probe, p99_limit_ms=args.p99_limit_ms, idle_s=1.5 if args.quick else 2.0, words=make_words(vocab, tokens_per_word),
        overload_rate=args.overload_rate,
    )  # fmt: skip
    workloads = seq_workloads(plan)
    warm_up = chat_body(plan.model, [{"role": "user", "content": "warm up"}], plan.stream)
    token_notes = []
    for name, warm, bodies in workloads:
        counts = [len(tokenizer.token_ids_sync(CHAT_PATH, json.loads(b)) or []) for b in (bodies[0], bodies[-1])]
        token_notes.append(f"{name}: {counts[0]}-{counts[1]} tokens ({len(bodies[0]) // 1024} KiB body)")
    mixed = mixed_schedule(plan.words, plan.model, 100, 2, 200, plan.prompt_tokens[0], seed=5)
    mixed_counts = [len(tokenizer.token_ids_sync(CHAT_PATH, json.loads(b)) or []) for _, b, _ in mixed[:40]]
    token_notes.append(f"open-loop mixed: {min(mixed_counts)}-{max(mixed_counts)} tokens, "
                       f"{sum(r for _, _, r in mixed) / max(1, len(mixed)):.0%} repeats")  # fmt: skip
    for note in token_notes:
        log(f"prompt size (tiny tokenizer) {note}")
    tokenizer.close()

    available_cpus = os.sched_getaffinity(0)
    client_cpus, _ = plan_cpus(available_cpus, 1)
    pinned = client_cpus is not None and not args.no_pin
    if pinned and client_cpus:
        os.sched_setaffinity(0, client_cpus)  # the fake engines started below inherit it
    pin_notes = [f"load generator + {args.engines} fake engines: cores {sorted(client_cpus)}" if pinned and client_cpus
                 else "no CPU pinning"]  # fmt: skip
    shares_a_core = False  # a router pinned to a core of the load generator's

    targets: list[Target] = []
    with fake_engines(args.engines, plan.model, tokenizer_dir, args.engine_base_port) as (engine_urls, engine_pids):
        log(f"{args.engines} fake engines up: {', '.join(engine_urls)}")
        direct = Target("direct", "direct", list(engine_urls), list(engine_pids))
        targets.append(direct)
        log("direct (fake engines)")
        measure_target(plan, direct, direct, workloads, warm_up)

        for policy in policies:
            for workers in workers_list:
                name = f"gateway {policy}" + (f" x{workers} workers" if workers > 1 else "")
                _, gateway_cpus = plan_cpus(available_cpus, workers)
                target = Target(name, "gateway")
                targets.append(target)
                log(f"{name}: starting" + (f" on cores {sorted(gateway_cpus)}" if pinned and gateway_cpus else ""))
                if pinned and gateway_cpus:
                    shared = sorted(gateway_cpus & client_cpus) if client_cpus else []
                    shares_a_core = shares_a_core or bool(shared)
                    pin_notes.append(f"{name}: cores {sorted(gateway_cpus)}"
                                     + (f" (core {', '.join(map(str, shared))} shared with the load generator)" if shared else ""))  # fmt: skip
                config = gateway_config(engine_urls, plan.model, tokenizer_dir, policy, workers)
                try:
                    with gateway_subprocess(config, cpus=gateway_cpus if pinned else None) as (url, proc):
                        target.urls, target.pids = [url], [proc.pid]
                        wait_gateway_ready(url, plan.model, policy)
                        measure_target(plan, target, direct, workloads, warm_up)
                except RuntimeError as exc:
                    target.error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
                    log(f"{name}: FAILED: {exc}")

        for url in args.target:
            url = url.rstrip("/")
            target = Target(urlsplit(url).netloc, "external", [url])
            targets.append(target)
            log(f"{target.name}: external router")
            try:
                wait_external_ready(url)
                pid = listening_pid(url)
                target.pids = [pid] if pid else []
                pin_notes.append(f"{target.name}: not pinned" + (f" (pid {pid} for CPU)" if pid else " (CPU unknown)"))
                measure_target(plan, target, direct, workloads, warm_up)
            except RuntimeError as exc:
                target.error = str(exc)
                log(f"{target.name}: FAILED: {exc}")

    summary = markdown_table(
        ["target", "workload", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "CPU ms/req",
         "highest clean req/s", "probe p99 ms", "others' CPU cores"],
        summary_rows(targets, direct, plan, args.ref_rate),
    )  # fmt: skip
    detail = markdown_table(
        ["target", "offered req/s", "sent", "achieved req/s", "p50 ms", "p99 ms", "errors", "error p50 ms",
         "CPU ms/req", "client lag p99 ms", "others' CPU cores", "probe p99 ms, clean"],
        open_loop_rows(targets, plan),
    )  # fmt: skip
    verdicts = verdict_rows(targets, direct, plan)
    disturbed = [r.others_cores for t in targets for r in t.seq.values()]
    disturbed += [p.others_cores for t in targets for p in t.points if not p.skipped]
    disturbed = [d for d in disturbed if not math.isnan(d)]
    warning = ""
    if disturbed and max(disturbed) > 0.25:
        warning = (f"**Disturbed run**: processes not started by this benchmark used {median(disturbed):.2f} cores "
                   f"(median over phases, up to {max(disturbed):.2f}) of {os.cpu_count()} while it measured; "
                   "see the last column. Rerun on a quiet machine before trusting a difference.\n\n")  # fmt: skip
        log(warning.strip().replace("**", ""))
    idle = ", ".join(f"{t.name} {_fmt(t.idle_probe_p99_ms)} ms" for t in targets if not t.error)
    notes = [
        f"Fake engines: {args.engines} (`bench/fake_engine.py`), model {plan.model}; CPU pinning: {'; '.join(pin_notes)}."
        + (" A router on a core shared with the load generator also waits while the client and the engines run"
           " there: only a machine with more cores than its workers measures it alone."
           if shares_a_core else ""),
        f"Sequential: {plan.requests} requests per workload, direct and routed interleaved per request"
        f" ({'streamed' if plan.stream else 'non-streamed'}, max_tokens 3). Prompt sizes: {'; '.join(token_notes)}.",
        f"Open loop: Poisson, {plan.duration_s:g} s per rate (at most {plan.max_requests} requests), timeout "
        f"{plan.timeout_s:g} s; clean = 0 errors, p99 < {plan.p99_limit_ms:g} ms, >= 90 % of the rate completed.",
        (f"Overload (routers only): {plan.overload_rate:g} req/s, the same way, its connections opened as the"
         " client's pool needs them; refusals (429, 503) are expected, anything else counts as lost."
         if plan.overload_rate > 0 else "No overload phase."),
        f"Probe (GET /health every {PROBE_INTERVAL_S * 1000:.0f} ms) p99 when idle: {idle}.",
        "CPU ms/req: the target's process tree (user+system), minus its idle rate, per request sent to it"
        " (direct: the fake engines). Others' CPU: cores busy with processes not started by this benchmark"
        " during the phase (other users of a shared machine); well above 0, the numbers are disturbed.",
        f"Run took {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs (load average at the end "
        f"{os.getloadavg()[0]:.2f}).",
    ]  # fmt: skip
    body = "\n\n".join([
        warning + summary,
        "### Issue goals\n\n" + (markdown_table(["router", "measure", "value", "goal", ""], verdicts) if verdicts else "(no router measured)"),
        "### Open loop, every rate\n\n" + detail,
        "\n".join(f"- {n}" for n in notes),
    ])  # fmt: skip
    if not args.no_report:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        png = REPORT_DIR / f"overhead-{stamp}.png"
        plotted = plot(targets, png, plan.p99_limit_ms)
        report_body = body + (f"\n\n![p50/p99 latency vs offered rate]({png.name})\n" if plotted else "")
        path = write_report("overhead", "Router overhead against fake engines", report_body)
        if plotted and png.name != path.with_suffix(".png").name:  # name the plot after the report
            old_name, png = png.name, png.rename(path.with_suffix(".png"))
            path.write_text(path.read_text().replace(f"({old_name})", f"({png.name})"))
        body += f"\n\nreport: {path}" + (f"\nplot: {png}" if plotted else "")
    return body


if __name__ == "__main__":
    sys.exit(main())
