"""Many concurrent streams, and a long steady load, through the gateway against fake engines.

    python -m bench.load streams [--streams 5000] [--ramp-s 50] [--hold-s 10] [--inter-token-ms 1000]
    python -m bench.load soak [--rate 50] [--duration-s 1800] [--window-s 60]
    python -m bench.load streams soak ...        # both, one after the other, on the same fake engines

Starts `--engines` fake vLLM servers (`bench/fake_engine.py`; `--engine-url` uses running ones
instead), each answer paced like a decoding engine through the request headers `x-fake-tokens`
/ `x-fake-inter-token-ms`, and for each mode a fresh `python -m gateway`: the fake engines, the
tiny model's tokenizer directory for the model (as `bench.overhead` does) and `--policy`
(default `prefix`, the gateway's default too), nothing else; any server limit the gateway's
config has is set out of the way (`HIGH_LIMITS`; `gateway_config` is the one place the YAML is
written). This process raises its own RLIMIT_NOFILE soft limit to the hard one first; the
engines and the gateway inherit it (`--gateway-nofile N` starts the gateway with soft limit N
instead, as systemd's 1024).

`streams`: opens `--streams` streaming chat completions, evenly over `--ramp-s` seconds, each its
own connection (one client each), with streams long enough that all of them are open at once for
`--hold-s` seconds: the first token at once, one more every `--inter-token-ms`. Every
`--sample-s` it samples the streams open at the client, the gateway's `gateway_engine_in_flight`
(summed) and how long its /metrics took, the fake engines' own answers in progress, the
gateway's RSS (/proc/PID/status VmRSS), open file descriptors (/proc/PID/fd) and CPU, this
client's and the engines' CPU, and what other processes took of the gateway's core. Reports
errors by kind, time to first token (and of it the TCP connect) and total duration
(p50/p90/p99/max, from the send), TTFT by send time, the gateway's own time-to-first-byte
histogram, the kernel's listen-queue overflows, the peak concurrency each side saw, RSS and fds
at the start (idle, after a warm-up), at the peak and at the end (all streams closed), and again
once the gateway's idle upstream connections have expired (aiohttp keeps them
`keepalive_timeout` = 30 s, closed on its next cleanup pass), up to `--settle-s`.

`soak`: an open-loop Poisson load at `--rate` req/s for `--duration-s`: chat completions of about
`--soak-prompt-tokens` tokens, `--stream-fraction` of them streamed, `--repeat-fraction` the next
turn of one of the 32 most recent conversations (a prefix the gateway has routed before), the
others a new conversation; each answer `--soak-tokens` tokens `--soak-inter-token-ms` apart. The
client keeps its connections alive (a pool, as the OpenAI SDK does). Per `--window-s` window:
requests completed, errors by kind, latency p50/p99 (to the last byte), time to first token p50/p99
of the streams, the gateway's RSS, fds and CPU at the window's end. At the end: start vs end RSS
and fds, and their slope over the run (least squares, per hour; also over its second half, which
leaves the warm-up out).

CPU: with two cores or more (and without `--no-pin`), this process and the fake engines run on
the first core, the gateway on the second, as in `bench.overhead`.

Output: the tables on stdout, progress on stderr, and bench/reports/load-<mode>-*.md with a JSON
file of every number (and a PNG of the samples, when matplotlib is installed) beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPORT_DIR, gateway_subprocess, markdown_table, percentile, write_report
from bench.overhead import (
    chat_body,
    fake_engines,
    gateway_config as overhead_gateway_config,
    make_words,
    plan_cpus,
    syllable_vocab,
    tree_cpu_seconds,
    wait_gateway_ready,
)

CHAT_PATH = "/v1/chat/completions"
TOKENS_PER_WORD = 2.08  # the tiny model's tokenizer on bench.overhead's syllable words (measured)
# Server limits the gateway may have (connection and concurrency caps, issue 10), set out of the
# test's way; a limit added under another name goes here. Only the keys this checkout's config
# knows are written (the config refuses unknown keys).
HIGH_LIMITS: dict[str, dict[str, Any]] = {
    # The gateway lowers both to what its open-file limit leaves room for (gateway.limits).
    "limits": {"max_connections": 1_000_000, "max_concurrent_requests": 1_000_000},
}
FD_SLACK = 32  # fds above the idle count still counted as "back to the start"


def log(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested)
# ---------------------------------------------------------------------------------------------


def gateway_config(engine_urls: Sequence[str], model: str, tokenizer_dir: str,
                   policy: str = "prefix") -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The gateway's YAML as a dict, and what differs from the defaults beyond the engines,
    the tokenizer and the policy (`prefix` is the default one): any server limits, set high."""
    from gateway.config import GatewayConfig

    config = overhead_gateway_config(engine_urls, model, tokenizer_dir, policy, 1)
    changed = []
    for section, limits in HIGH_LIMITS.items():
        annotation = GatewayConfig.model_fields[section].annotation
        known = getattr(annotation, "model_fields", {})
        for key, value in limits.items():
            if key in known:
                config.setdefault(section, {})[key] = value
                changed.append(f"{section}.{key}: {value}")
    return config, changed


def stream_tokens(ramp_s: float, hold_s: float, inter_token_ms: float) -> int:
    """Tokens per stream so that the first stream opened is still open when the last one has
    been open `hold_s`: (tokens - 1) * interval >= ramp + hold."""
    return max(2, math.ceil((ramp_s + hold_s) * 1000 / inter_token_ms) + 1)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of `values` (NaN when empty)."""
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values) if values else float("nan"), "count": float(len(values))}  # fmt: skip


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour; NaN with fewer than two."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


def error_kind(exc: BaseException) -> str:
    """A short name for a failed request: timeout, connect, disconnected, payload, os_EMFILE..."""
    import errno

    import aiohttp

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        name = errno.errorcode.get(exc.os_error.errno or 0, "") if exc.os_error else ""
        return f"connect_{name}" if name else "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload"
    if isinstance(exc, OSError) and exc.errno:
        return f"os_{errno.errorcode.get(exc.errno, exc.errno)}"
    # No errno (aiohttp's "Cannot write to closing transport"...): the message says which.
    message = re.sub(r"\s+", " ", str(exc)).strip()[:60]
    return f"{type(exc).__name__}({message})" if message else type(exc).__name__


def histogram_quantiles(text: str, name: str, qs: Sequence[float]) -> dict[str, float]:
    """Upper bounds of quantiles `qs` (0..1) of a Prometheus histogram summed over its label
    sets (the `le` bucket where the cumulative count crosses each), and its count and mean."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = re.search(r'le="([^"]+)"', line)
            if le:
                bound = float(le.group(1))
                buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    out = {"count": count, "mean": total / count if count else float("nan")}
    for q in qs:
        out[f"p{q * 100:g}_le"] = next((b for b in sorted(buckets) if count and buckets[b] >= q * count), float("nan"))
    return out


def listen_drops() -> dict[str, int]:
    """The kernel's listen-queue overflow and drop counters (this network namespace)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(row[k]) for k in ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop") if k in row}
    return {}


def core_busy_s(cores: set[int] | None) -> float:
    """CPU seconds the given cores were busy (any process); 0 without cores."""
    if not cores:
        return 0.0
    import psutil

    times = psutil.cpu_times(percpu=True)
    return float(sum(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
               for i, t in enumerate(times) if i in cores))  # fmt: skip


def over_time(outcomes: Sequence[Outcome], bin_s: float) -> list[dict[str, float]]:
    """TTFT p50/p99 (ms) of the successful streams, by the bin of their send time."""
    bins: dict[int, list[float]] = {}
    for o in outcomes:
        if o.kind == "ok" and o.ttft is not None:
            bins.setdefault(int(o.sent_at // bin_s), []).append(o.ttft * 1000)
    return [{"t": (b + 1) * bin_s, "sent": float(len(v)), "ttft_p50_ms": percentile(v, 50),
             "ttft_p99_ms": percentile(v, 99)} for b, v in sorted(bins.items())]  # fmt: skip


class Conversations:
    """The soak's prompts: a new conversation, or with probability `repeat_fraction` the next
    turn of one of the `active` most recent ones (whose earlier turns went through before)."""

    def __init__(self, rng: random.Random, prompt_tokens: int, repeat_fraction: float, active: int = 32,
                 max_turns: int = 8) -> None:  # fmt: skip
        self._rng = rng
        self._words = make_words(syllable_vocab(), TOKENS_PER_WORD)
        self._tokens = prompt_tokens
        self._repeat = repeat_fraction
        self._active = active
        self._max_turns = max_turns
        self._recent: list[list[dict[str, str]]] = []

    def next(self) -> tuple[list[dict[str, str]], bool]:
        """(messages, whether it extends an earlier conversation)."""
        rng, words = self._rng, self._words
        open_ = [c for c in self._recent if len(c) < 2 + 2 * self._max_turns]
        if open_ and rng.random() < self._repeat:
            messages = rng.choice(open_)
            messages += [{"role": "assistant", "content": words(rng, 30)}, {"role": "user", "content": words(rng, 30)}]
            return list(messages), True
        messages = [{"role": "system", "content": words(rng, max(1, self._tokens - 60))},
                    {"role": "user", "content": words(rng, 40)}]  # fmt: skip
        self._recent = [*self._recent[-(self._active - 1) :], messages]
        return list(messages), False


# ---------------------------------------------------------------------------------------------
# Processes: file limits, /proc snapshots
# ---------------------------------------------------------------------------------------------


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit towards `wanted` (the hard limit too where
    allowed, i.e. as root); children inherit it. Returns the (soft, hard) limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class Snapshot:
    """A process at one moment: resident memory, open fds, CPU seconds so far, threads."""

    t: float  # seconds since the mode started
    rss_mib: float
    fds: int
    cpu_s: float
    threads: int


def proc_snapshot(pid: int, t0: float) -> Snapshot:
    rss_kib, threads = 0, 0
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Snapshot(round(time.monotonic() - t0, 3), rss_kib / 1024, fds, tree_cpu_seconds([pid]), threads)


# ---------------------------------------------------------------------------------------------
# HTTP pieces (aiohttp on uvloop)
# ---------------------------------------------------------------------------------------------


def _session(limit: int, force_close: bool) -> Any:
    """A client session; a request given `trace_request_ctx=Outcome` gets its `connected` time
    when it opened a new connection."""
    import aiohttp

    async def connected(session: Any, context: Any, params: Any) -> None:
        outcome = context.trace_request_ctx
        if isinstance(outcome, Outcome):
            outcome.connected = time.perf_counter()  # made relative in request_once

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(connected)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=force_close, ttl_dns_cache=None),
        auto_decompress=False, skip_auto_headers=("User-Agent",), trace_configs=[trace],
    )  # fmt: skip


_IN_FLIGHT = re.compile(rb"^gateway_engine_in_flight\{[^}]*\} ([0-9.e+-]+)$", re.M)
_ACTIVE = re.compile(rb"^fake_engine_active_responses ([0-9]+)$", re.M)


async def _get(session: Any, url: str) -> bytes | None:
    import aiohttp

    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return bytes(await resp.read()) if resp.status == 200 else None
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
        return None


async def gateway_in_flight(session: Any, url: str) -> float | None:
    text = await _get(session, f"{url}/metrics")
    return None if text is None else sum(float(v) for v in _IN_FLIGHT.findall(text))


async def engines_active(session: Any, urls: Sequence[str]) -> int | None:
    texts = await asyncio.gather(*(_get(session, f"{u}/metrics") for u in urls))
    if any(t is None for t in texts):
        return None
    return sum(int(m) for t in texts if t is not None for m in _ACTIVE.findall(t))


@dataclass
class Outcome:
    """One request as the client saw it (seconds from its send)."""

    kind: str  # "ok" or the error's kind
    sent_at: float  # since the phase started
    connected: float | None = None  # a new connection established (the TCP handshake)
    headers: float | None = None  # the response's headers
    ttft: float | None = None  # first body byte
    duration: float | None = None  # last byte
    events: int = 0  # `data:` events received


def pace_headers(tokens: int, inter_token_ms: float) -> dict[str, str]:
    return {"content-type": "application/json", "x-fake-tokens": str(tokens),
            "x-fake-inter-token-ms": f"{inter_token_ms:g}"}  # fmt: skip


async def request_once(session: Any, url: str, body: bytes, headers: dict[str, str], timeout: Any, stream: bool,
                       sent_at: float, on_headers: Callable[[], None] | None = None) -> Outcome:  # fmt: skip
    """POST one chat; a stream is read chunk by chunk (TTFT = its first body chunk). Errors: a
    status other than 200 (`http_503`), an in-band error event (`stream_error`), a stream that
    ends without `[DONE]` (`no_done`), or the exception's kind (`error_kind`)."""
    import aiohttp

    start = time.perf_counter()
    outcome = Outcome("ok", sent_at)
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout, trace_request_ctx=outcome) as resp:
            outcome.headers = time.perf_counter() - start
            if on_headers is not None:
                on_headers()
            if resp.status != 200:
                await resp.read()
                outcome.kind = f"http_{resp.status}"
            elif not stream:
                await resp.read()
                outcome.ttft = time.perf_counter() - start
            else:
                tail = b""
                async for chunk in resp.content.iter_any():
                    if outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - start
                    outcome.events += chunk.count(b"data: ")
                    if b'data: {"error"' in chunk:
                        outcome.kind = "stream_error"
                    tail = (tail + chunk)[-64:]
                if outcome.kind == "ok" and b"data: [DONE]" not in tail:
                    outcome.kind = "no_done"
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
        outcome.kind = error_kind(exc)
        if outcome.kind in ("timeout", "disconnected") or outcome.kind.startswith("os_"):  # where it broke
            outcome.kind += ("_before_headers" if outcome.headers is None else
                             "_before_first_byte" if outcome.ttft is None else "_mid_stream")  # fmt: skip
    outcome.duration = time.perf_counter() - start
    if outcome.connected is not None:
        outcome.connected -= start
    return outcome


def error_counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.kind != "ok":
            counts[o.kind] = counts.get(o.kind, 0) + 1
    return dict(sorted(counts.items()))


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


# ---------------------------------------------------------------------------------------------
# The fleet: fake engines, then a fresh gateway per mode
# ---------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    engine_urls: list[str]
    engine_pids: list[int]
    model: str
    tokenizer_dir: str
    gateway_cpus: set[int] | None  # None: not pinned
    policy: str
    gateway_nofile: int | None  # the gateway's soft open-file limit at its start (None: ours)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def fleet(args: argparse.Namespace, wanted_fds: int) -> Iterator[Fleet]:
    from bench.fake_engine import default_tokenizer_dir

    soft, hard = raise_nofile(wanted_fds)
    notes = [f"RLIMIT_NOFILE of this process, the engines and the gateway: soft {soft}, hard {hard}"
             f" (wanted {wanted_fds})"]  # fmt: skip
    if soft < wanted_fds:
        log(f"warning: open-file limit {soft} < {wanted_fds} wanted: expect EMFILE errors (raise `ulimit -Hn`)")
    client_cpus, gateway_cpus = plan_cpus(os.sched_getaffinity(0), 1)
    if args.no_pin or client_cpus is None:
        gateway_cpus = None
        notes.append("no CPU pinning")
    else:
        os.sched_setaffinity(0, client_cpus)  # the fake engines inherit it
        notes.append(f"client + {args.engines} fake engines on cores {sorted(client_cpus)}, "
                     f"gateway on {sorted(gateway_cpus or [])}")  # fmt: skip
    tokenizer_dir = default_tokenizer_dir()
    if args.engine_url:  # already running (tests: in this process); their CPU is not counted
        notes.append(f"fake engines given: {', '.join(args.engine_url)}")
        yield Fleet(list(args.engine_url), [], args.model, tokenizer_dir, gateway_cpus, args.policy,
                    args.gateway_nofile, notes)  # fmt: skip
        return
    with fake_engines(args.engines, args.model, tokenizer_dir) as (urls, pids):
        log(f"{args.engines} fake engines up: {', '.join(urls)}")
        yield Fleet(list(urls), list(pids), args.model, tokenizer_dir, gateway_cpus, args.policy,
                    args.gateway_nofile, notes)  # fmt: skip


@contextlib.contextmanager
def soft_nofile(limit: int | None) -> Iterator[None]:
    """This process's soft open-file limit set to `limit` meanwhile (what a process started
    meanwhile inherits, as from a service manager), then restored; None: unchanged."""
    if limit is None:
        yield
        return
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@contextlib.contextmanager
def gateway(f: Fleet) -> Iterator[tuple[str, int, list[str]]]:
    """A fresh gateway in front of the fleet: (url, pid, settings changed for the test)."""
    config, changed = gateway_config(f.engine_urls, f.model, f.tokenizer_dir, f.policy)
    with contextlib.ExitStack() as stack:
        with soft_nofile(f.gateway_nofile):
            url, proc = stack.enter_context(gateway_subprocess(config, cpus=f.gateway_cpus))
        wait_gateway_ready(url, f.model, f.policy)
        limit = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0]
        log(f"gateway up (pid {proc.pid}), its open-file limit {limit}")
        yield url, proc.pid, changed + ([f"started with soft RLIMIT_NOFILE {f.gateway_nofile}, now {limit}"]
                                        if f.gateway_nofile else [])  # fmt: skip


async def warm_up(url: str, model: str, count: int = 8) -> None:
    """A few streamed and plain chats, so the idle snapshot is of a gateway that served."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=10)
    async with _session(limit=0, force_close=True) as session:
        for i in range(count):
            body = chat_body(model, [{"role": "user", "content": f"warm up {i}"}], stream=i % 2 == 0)
            await request_once(session, url + CHAT_PATH, body, pace_headers(3, 0), timeout, i % 2 == 0, 0.0)


async def settle_fds(pid: int, t0: float, start_fds: int, max_s: float,
                     seen: list[Snapshot] | None = None) -> tuple[Snapshot, float]:  # fmt: skip
    """Wait (up to `max_s`) for the gateway's fds to come back within FD_SLACK of `start_fds`:
    its idle upstream connections close `keepalive_timeout` after their last use. Returns the
    last snapshot and how long it took; every snapshot taken goes to `seen`."""
    started = time.monotonic()
    while True:
        snap = proc_snapshot(pid, t0)
        if seen is not None:
            seen.append(snap)
        waited = time.monotonic() - started
        if snap.fds <= start_fds + FD_SLACK or waited >= max_s:
            return snap, waited
        await asyncio.sleep(1.0)


def run_loop(coro: Any) -> Any:
    from bench.fake_engine import run_loop as run

    return run(coro)


# ---------------------------------------------------------------------------------------------
# Mode `streams`
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamSample:
    t: float
    client_open: int  # requests sent and not finished
    client_streaming: int  # of which the response headers arrived
    gateway_in_flight: float | None
    engines_active: int | None
    rss_mib: float
    fds: int
    gateway_cores: float  # CPU since the previous sample
    client_cores: float
    engines_cores: float
    metrics_ms: float | None  # how long the gateway took to answer GET /metrics (its event loop's lag)
    gateway_core_others: float  # cores' worth of other processes on the gateway's core (pinned only)


@dataclass
class StreamsResult:
    streams: int
    tokens: int
    inter_token_ms: float
    stream_s: float  # how long the engine takes per stream
    ramp_s: float
    hold_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[StreamSample] = field(default_factory=list)
    start: Snapshot | None = None
    peak: Snapshot | None = None
    end: Snapshot | None = None
    settled: Snapshot | None = None
    settle_s: float = 0.0
    settling: list[Snapshot] = field(default_factory=list)
    in_flight_after: float | None = None
    engines_active_after: int | None = None
    gateway_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    engines_cpu_s: float = 0.0
    wall_s: float = 0.0
    send_lag_ms: list[float] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    gateway_ttft: dict[str, float] = field(default_factory=dict)  # its own histogram (upper bounds)
    listen_drops: dict[str, int] = field(default_factory=dict)  # kernel counters, during the phase


async def streams_phase(args: argparse.Namespace, f: Fleet, url: str, pid: int) -> StreamsResult:
    import aiohttp

    tokens = stream_tokens(args.ramp_s, args.hold_s, args.inter_token_ms)
    stream_s = (tokens - 1) * args.inter_token_ms / 1000
    result = StreamsResult(args.streams, tokens, args.inter_token_ms, stream_s, args.ramp_s, args.hold_s)
    rng = random.Random(args.seed)
    words = make_words(syllable_vocab(), TOKENS_PER_WORD)
    systems = [words(rng, args.prompt_tokens) for _ in range(max(1, args.groups))]
    bodies = [chat_body(f.model, [{"role": "system", "content": systems[i % len(systems)]},
                                  {"role": "user", "content": f"stream {i}: {words(rng, 20)}"}], stream=True)
              for i in range(args.streams)]  # fmt: skip
    headers = pace_headers(tokens, args.inter_token_ms)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.connect_timeout_s, sock_read=args.read_timeout_s)
    await warm_up(url, f.model)
    t0 = time.monotonic()
    result.start = proc_snapshot(pid, t0)
    log(f"streams: gateway idle: RSS {result.start.rss_mib:.0f} MiB, {result.start.fds} fds; opening {args.streams} "
        f"streams over {args.ramp_s:g} s, each {tokens} tokens {args.inter_token_ms:g} ms apart ({stream_s:.0f} s)")  # fmt: skip
    counts = {"open": 0, "streaming": 0}
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def sampler(session: Any) -> None:
        last = (time.monotonic(), tree_cpu_seconds([pid]), time.process_time(), tree_cpu_seconds(f.engine_pids),
                core_busy_s(f.gateway_cpus))  # fmt: skip
        best = -1
        while True:
            try:
                await asyncio.wait_for(done.wait(), args.sample_s)
            except asyncio.TimeoutError:
                pass
            asked = time.perf_counter()
            in_flight, active = await asyncio.gather(gateway_in_flight(session, url),
                                                     engines_active(session, f.engine_urls))  # fmt: skip
            metrics_ms = (time.perf_counter() - asked) * 1000 if in_flight is not None else None
            snap = proc_snapshot(pid, t0)
            now = (time.monotonic(), snap.cpu_s, time.process_time(), tree_cpu_seconds(f.engine_pids),
                   core_busy_s(f.gateway_cpus))  # fmt: skip
            dt = max(1e-9, now[0] - last[0])
            sample = StreamSample(snap.t, counts["open"], counts["streaming"], in_flight, active, snap.rss_mib,
                                  snap.fds, (now[1] - last[1]) / dt, (now[2] - last[2]) / dt, (now[3] - last[3]) / dt,
                                  metrics_ms, max(0.0, (now[4] - last[4]) - (now[1] - last[1])) / dt)  # fmt: skip
            last = now
            result.samples.append(sample)
            if len(result.samples) % max(1, round(10 / args.sample_s)) == 0:
                log(f"streams: t {sample.t:.0f} s: open {sample.client_open}, answered {sample.client_streaming}, "
                    f"gateway in-flight {sample.gateway_in_flight}, engines {sample.engines_active}, "
                    f"done {len(result.outcomes)} (errors {sum(o.kind != 'ok' for o in result.outcomes)}), "
                    f"fds {sample.fds}, gateway {sample.gateway_cores:.2f} cores")  # fmt: skip
            if sample.client_streaming > best:
                best, result.peak = sample.client_streaming, snap
            if done.is_set():
                return

    async def one(i: int, due: float, session: Any) -> None:
        result.send_lag_ms.append((loop.time() - due) * 1000)
        counts["open"] += 1
        answered = [False]

        def on_headers() -> None:
            answered[0] = True
            counts["streaming"] += 1

        outcome = await request_once(session, url + CHAT_PATH, bodies[i], headers, timeout, True, due - begin,
                                     on_headers)  # fmt: skip
        counts["open"] -= 1
        counts["streaming"] -= answered[0]
        result.outcomes.append(outcome)

    cpu0 = (tree_cpu_seconds([pid]), time.process_time(), tree_cpu_seconds(f.engine_pids))
    drops0 = listen_drops()
    async with _session(limit=0, force_close=True) as session, _session(limit=8, force_close=False) as probe:
        sampling = asyncio.ensure_future(sampler(probe))
        begin = loop.time() + 0.05
        tasks = []
        for i in range(args.streams):
            due = begin + i * args.ramp_s / max(1, args.streams)
            delay = due - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, due, session)))
        await asyncio.gather(*tasks)
        result.wall_s = loop.time() - begin
        result.end = proc_snapshot(pid, t0)
        result.gateway_cpu_s = result.end.cpu_s - cpu0[0]
        result.client_cpu_s = time.process_time() - cpu0[1]
        result.engines_cpu_s = tree_cpu_seconds(f.engine_pids) - cpu0[2]
        done.set()
        await sampling
        result.in_flight_after = await gateway_in_flight(probe, url)
        result.engines_active_after = await engines_active(probe, f.engine_urls)
        metrics = await _get(probe, f"{url}/metrics")
        result.gateway_ttft = histogram_quantiles((metrics or b"").decode(), "gateway_time_to_first_byte_seconds",
                                                  (0.5, 0.9, 0.99))  # fmt: skip
    drops1 = listen_drops()
    result.listen_drops = {k: drops1[k] - drops0.get(k, 0) for k in drops1}
    errors = error_counts(result.outcomes)
    log(f"streams: all {len(result.outcomes)} done in {result.wall_s:.1f} s, errors: {_kinds(errors)}; "
        f"gateway RSS {result.end.rss_mib:.0f} MiB, {result.end.fds} fds; waiting for its fds to settle")  # fmt: skip
    result.settled, result.settle_s = await settle_fds(pid, t0, result.start.fds, args.settle_s, result.settling)
    return result


def streams_report(r: StreamsResult, f: Fleet, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    ok = [o for o in r.outcomes if o.kind == "ok"]
    errors = error_counts(r.outcomes)
    ttft = summarize([o.ttft * 1000 for o in ok if o.ttft is not None])
    connect = summarize([o.connected * 1000 for o in ok if o.connected is not None])
    total = summarize([o.duration for o in ok if o.duration is not None])
    short = sum(1 for o in ok if o.events != r.tokens + 1)
    peak_client = max((s.client_streaming for s in r.samples), default=0)
    peak_gateway = max((s.gateway_in_flight or 0 for s in r.samples), default=0)
    peak_engines = max((s.engines_active or 0 for s in r.samples), default=0)
    at_all = [s for s in r.samples if s.client_streaming >= r.streams]
    held_s = (at_all[-1].t - at_all[0].t) if at_all else 0.0
    assert r.start is not None and r.end is not None and r.settled is not None
    peak = r.peak or r.end
    busy = [s for s in r.samples if s.client_open > 0]
    metrics_ms = [s.metrics_ms for s in busy if s.metrics_ms is not None]
    load_s = max(1e-9, r.wall_s)

    def cores(values: Sequence[float]) -> str:
        return f"{sum(values) / len(values):.2f} / {max(values):.2f}" if values else "-"

    summary = markdown_table(["measure", "value"], [
        ["streams opened / completed ok", f"{len(r.outcomes)} / {len(ok)}"],
        ["errors by kind", _kinds(errors)],
        ["streams with a missing token", short],
        ["peak concurrent streams: client / gateway in-flight / fake engines", f"{peak_client} / {peak_gateway:g} / {peak_engines}"],
        ["all streams open at once for (s, sampled)", f"{held_s:.1f}"],
        ["TTFT p50 / p90 / p99 / max (ms)", f"{ttft['p50']:.1f} / {ttft['p90']:.1f} / {ttft['p99']:.1f} / {ttft['max']:.1f}"],
        ["of which TCP connect p50 / p99 / max (ms)",
         f"{connect['p50']:.1f} / {connect['p99']:.1f} / {connect['max']:.1f}"],
        ["gateway's own time to first byte (its histogram: p50 / p90 / p99 at most, s)",
         f"{r.gateway_ttft.get('p50_le', float('nan')):g} / {r.gateway_ttft.get('p90_le', float('nan')):g} / "
         f"{r.gateway_ttft.get('p99_le', float('nan')):g}"],
        ["listen-queue overflows / drops (kernel, during the run)",
         f"{r.listen_drops.get('ListenOverflows', '-')} / {r.listen_drops.get('ListenDrops', '-')}"],
        [f"duration p50 / p90 / p99 / max (s; the engine takes {r.stream_s:g})",
         f"{total['p50']:.2f} / {total['p90']:.2f} / {total['p99']:.2f} / {total['max']:.2f}"],
        ["tokens/s through the gateway with all streams open", f"{r.streams * 1000 / r.inter_token_ms:.0f}"],
        ["gateway GET /metrics time p50 / max while streaming (ms)",
         f"{percentile(metrics_ms, 50):.0f} / {max(metrics_ms, default=float('nan')):.0f}"],
        ["client send lag p99 / max (ms)", f"{percentile(r.send_lag_ms, 99):.1f} / {max(r.send_lag_ms, default=float('nan')):.1f}"],
        ["gateway CPU: cores mean / max per sample; ms per stream",
         f"{cores([s.gateway_cores for s in busy])}; {r.gateway_cpu_s * 1000 / max(1, len(r.outcomes)):.2f}"],
        ["client CPU: cores mean / max per sample", cores([s.client_cores for s in busy])],
        ["fake engines CPU: cores mean / max per sample", cores([s.engines_cores for s in busy])],
        ["other processes on the gateway's core: cores mean / max per sample",
         cores([s.gateway_core_others for s in busy]) if f.gateway_cpus else "(not pinned)"],
        ["run (s): ramp / total", f"{r.ramp_s:g} / {load_s:.1f}"],
    ])  # fmt: skip
    gateway_rows = [
        ["start (idle, after warm-up)", f"{r.start.t:.0f}", f"{r.start.rss_mib:.0f}", r.start.fds, r.start.threads],
        ["peak (most streams open)", f"{peak.t:.0f}", f"{peak.rss_mib:.0f}", peak.fds, peak.threads],
        ["end (all streams closed)", f"{r.end.t:.0f}", f"{r.end.rss_mib:.0f}", r.end.fds, r.end.threads],
        [f"settled ({r.settle_s:.0f} s later)", f"{r.settled.t:.0f}", f"{r.settled.rss_mib:.0f}", r.settled.fds,
         r.settled.threads],
    ]  # fmt: skip
    gateway_table = markdown_table(["gateway", "t (s)", "RSS (MiB)", "open fds", "threads"], gateway_rows)
    fds_back = r.settled.fds <= r.start.fds + FD_SLACK
    checks = markdown_table(["check", "value", ""], [
        ["no errors", _kinds(errors), "PASS" if not errors else "FAIL"],
        [f"all {r.streams} open at once (client, gateway, engines)", f"{peak_client} / {peak_gateway:g} / {peak_engines}",
         "PASS" if min(peak_client, peak_gateway, peak_engines) >= r.streams else "FAIL"],
        [f"fds back within {FD_SLACK} of the start", f"{r.start.fds} -> {r.settled.fds}", "PASS" if fds_back else "FAIL"],
        ["gateway in-flight back to 0", f"{r.in_flight_after}", "PASS" if r.in_flight_after == 0 else "FAIL"],
        ["fake engines' answers back to 0", f"{r.engines_active_after}", "PASS" if r.engines_active_after == 0 else "FAIL"],
    ])  # fmt: skip
    notes = [
        f"Fake engines: {len(f.engine_urls)}; {'; '.join(f.notes)}.",
        f"Streams: {r.streams}, one connection each (closed after its stream), sent evenly over {r.ramp_s:g} s; "
        f"each {r.tokens} tokens {r.inter_token_ms:g} ms apart (the engine takes {r.stream_s:g} s), so all are "
        f"open at once for about {r.stream_s - r.ramp_s:.0f} s. Prompts: {args.groups} shared system prompts of "
        f"~{args.prompt_tokens} tokens plus a unique user turn.",
        f"Gateway: policy {f.policy}, the defaults otherwise"
        + (f"; set for the test: {', '.join(r.changed)}" if r.changed else " (no server limit exists to raise)") + ".",
        "TTFT: from the send (connection included) to the first body byte; duration: to the last.",
        f"Samples every {args.sample_s:g} s: client streams with headers, the gateway's summed "
        "gateway_engine_in_flight, the engines' fake_engine_active_responses; CPU per sample over its interval.",
        f"Machine: {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f}.",
    ]  # fmt: skip
    body = "\n\n".join([summary, "### Gateway process\n\n" + gateway_table, "### Checks\n\n" + checks,
                        "\n".join(f"- {n}" for n in notes)])  # fmt: skip
    data = {
        "mode": "streams", "args": vars(args), "streams": r.streams, "tokens": r.tokens,
        "inter_token_ms": r.inter_token_ms, "stream_s": r.stream_s, "errors": errors, "ok": len(ok),
        "missing_tokens": short, "ttft_ms": ttft, "connect_ms": connect, "duration_s": total,
        "gateway_ttft_s": r.gateway_ttft, "listen_drops": r.listen_drops,
        "ttft_over_time": over_time(r.outcomes, max(1.0, r.ramp_s / 25)),
        "peak": {"client": peak_client, "gateway_in_flight": peak_gateway, "engines": peak_engines},
        "all_open_s": held_s,
        "gateway": {"start": asdict(r.start), "peak": asdict(peak), "end": asdict(r.end), "settled": asdict(r.settled),
                    "settle_s": r.settle_s, "cpu_s": r.gateway_cpu_s, "in_flight_after": r.in_flight_after},
        "client_cpu_s": r.client_cpu_s, "engines_cpu_s": r.engines_cpu_s, "wall_s": r.wall_s,
        "send_lag_ms": summarize(r.send_lag_ms), "changed": r.changed, "notes": notes,
        "samples": [asdict(s) for s in r.samples], "settling": [asdict(s) for s in r.settling],
    }  # fmt: skip
    return body, data


def plot_streams(r: StreamsResult, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, (ax1, ax4, ax2, ax3) = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
    t = [s.t for s in r.samples]
    bins = over_time(r.outcomes, max(1.0, r.ramp_s / 25))
    ax4.plot([b["t"] for b in bins], [b["ttft_p50_ms"] for b in bins], label="TTFT p50")
    ax4.plot([b["t"] for b in bins], [b["ttft_p99_ms"] for b in bins], label="TTFT p99")
    ax4.set_ylabel("TTFT (ms), by send time")
    ax4.legend(fontsize=7)
    ax1.plot(t, [s.client_streaming for s in r.samples], label="client: streams open")
    ax1.plot(t, [s.gateway_in_flight or 0 for s in r.samples], "--", label="gateway in-flight")
    ax1.plot(t, [s.engines_active or 0 for s in r.samples], ":", label="fake engines: answers in progress")
    ax1.set_ylabel("concurrent streams")
    ax1.legend(fontsize=7)
    both = [(s.t, s.rss_mib, s.fds) for s in r.samples] + [(s.t, s.rss_mib, s.fds) for s in r.settling]
    ax2.plot([b[0] for b in both], [b[1] for b in both], color="C3", label="RSS (MiB)")
    ax2.set_ylabel("gateway RSS (MiB)")
    twin = ax2.twinx()
    twin.plot([b[0] for b in both], [b[2] for b in both], color="C4", label="open fds")
    twin.set_ylabel("gateway open fds")
    ax2.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax3.plot(t, [s.gateway_cores for s in r.samples], label="gateway")
    ax3.plot(t, [s.client_cores for s in r.samples], label="client")
    ax3.plot(t, [s.engines_cores for s in r.samples], label="fake engines")
    if any(s.gateway_core_others for s in r.samples):
        ax3.plot(t, [s.gateway_core_others for s in r.samples], ":", label="others on the gateway's core")
    ax3.set_ylabel("CPU (cores)")
    ax3.set_xlabel("time (s)")
    ax3.legend(fontsize=7)
    fig.suptitle(f"{r.streams} concurrent streams through the gateway")
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_streams(args: argparse.Namespace, f: Fleet) -> tuple[str, dict[str, Any], Callable[[Path], bool]]:
    with gateway(f) as (url, pid, changed):
        result: StreamsResult = run_loop(streams_phase(args, f, url, pid))
    result.changed = changed
    body, data = streams_report(result, f, args)
    return body, data, lambda path: plot_streams(result, path)


# ---------------------------------------------------------------------------------------------
# Mode `soak`
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    index: int
    end_t: float  # seconds since the load started
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # completed ok: p50, p99
    ttft_ms: dict[str, float] = field(default_factory=dict)  # streams: p50, p99
    rss_mib: float = 0.0
    fds: int = 0
    gateway_cores: float = 0.0
    client_cores: float = 0.0
    in_flight: int = 0  # client requests not finished at the window's end
    send_lag_p99_ms: float = float("nan")  # how late this client sent (its own starvation)
    load_avg: float = float("nan")  # the machine's 1-minute load average at the window's end


@dataclass
class SoakResult:
    rate: float
    duration_s: float
    windows: list[Window] = field(default_factory=list)
    start: Snapshot | None = None
    end: Snapshot | None = None  # the load over, every request finished
    settled: Snapshot | None = None
    settle_s: float = 0.0
    sent: int = 0
    streamed: int = 0
    repeats: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    ttft_ms: dict[str, float] = field(default_factory=dict)
    send_lag_ms: dict[str, float] = field(default_factory=dict)
    gateway_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    wall_s: float = 0.0
    changed: list[str] = field(default_factory=list)


async def soak_phase(args: argparse.Namespace, f: Fleet, url: str, pid: int) -> SoakResult:
    import aiohttp

    result = SoakResult(args.rate, args.duration_s)
    rng = random.Random(args.seed)
    conversations = Conversations(rng, args.soak_prompt_tokens, args.repeat_fraction)
    headers = pace_headers(args.soak_tokens, args.soak_inter_token_ms)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    await warm_up(url, f.model)
    t0 = time.monotonic()
    result.start = proc_snapshot(pid, t0)
    log(f"soak: gateway idle: RSS {result.start.rss_mib:.0f} MiB, {result.start.fds} fds; {args.rate:g} req/s for "
        f"{args.duration_s:g} s, windows of {args.window_s:g} s")  # fmt: skip
    loop = asyncio.get_running_loop()
    finished: list[Outcome] = []  # since the last window
    all_ok_ms: list[float] = []
    all_ttft_ms: list[float] = []
    lags: list[float] = []
    pending: set[asyncio.Future[None]] = set()
    sent_in_window = [0]
    lag_mark = [0]  # lags before it belong to earlier windows

    async def one(body: bytes, stream: bool, due: float) -> None:
        outcome = await request_once(session, url + CHAT_PATH, body, headers, timeout, stream, due - begin)
        outcome.events = int(stream)  # reused: 1 for a stream
        finished.append(outcome)
        result.errors[outcome.kind] = result.errors.get(outcome.kind, 0) + (outcome.kind != "ok")
        if outcome.kind == "ok" and outcome.duration is not None:
            all_ok_ms.append(outcome.duration * 1000)
            if stream and outcome.ttft is not None:
                all_ttft_ms.append(outcome.ttft * 1000)

    def close_window(index: int, end_t: float, last: list[float]) -> Window:
        batch = finished[:]
        finished.clear()
        snap = proc_snapshot(pid, t0)
        now = (time.monotonic(), snap.cpu_s, time.process_time())
        dt = max(1e-9, now[0] - last[0])
        ok_ms = [o.duration * 1000 for o in batch if o.kind == "ok" and o.duration is not None]
        ttft = [o.ttft * 1000 for o in batch if o.kind == "ok" and o.events and o.ttft is not None]
        window = Window(index, round(end_t, 1), sent_in_window[0], len(batch), error_counts(batch),
                        {"p50": percentile(ok_ms, 50), "p99": percentile(ok_ms, 99)},
                        {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)}, snap.rss_mib, snap.fds,
                        (now[1] - last[1]) / dt, (now[2] - last[2]) / dt, len(pending),
                        percentile(lags[lag_mark[0] :], 99), os.getloadavg()[0])  # fmt: skip
        lag_mark[0] = len(lags)
        last[:] = now
        sent_in_window[0] = 0
        log(f"soak window {index}: sent {window.sent}, done {window.completed}, errors {_kinds(window.errors)}, "
            f"p50 {window.latency_ms['p50']:.1f} ms p99 {window.latency_ms['p99']:.1f} ms, RSS {window.rss_mib:.0f} MiB, "
            f"{window.fds} fds, gateway {window.gateway_cores:.2f} cores")  # fmt: skip
        return window

    cpu0 = (result.start.cpu_s, time.process_time())
    async with _session(limit=args.connections, force_close=False) as session:
        begin = loop.time() + 0.05
        last = [time.monotonic(), result.start.cpu_s, time.process_time()]
        next_window = args.window_s
        at = rng.expovariate(args.rate)
        while True:
            now = loop.time() - begin
            while now >= next_window and next_window <= args.duration_s + 1e-9:
                result.windows.append(close_window(len(result.windows), next_window, last))
                next_window += args.window_s
            if at >= args.duration_s:  # nothing more to send: the windows still run to the end
                if next_window > args.duration_s + 1e-9:
                    break
                await asyncio.sleep(max(0.0, next_window - now))
                continue
            wait = min(at, next_window) - now
            if wait > 0.0005:
                await asyncio.sleep(wait)
                continue
            messages, repeat = conversations.next()
            stream = rng.random() < args.stream_fraction
            body = chat_body(f.model, messages, stream=stream)
            lags.append((loop.time() - begin - at) * 1000)
            task = asyncio.ensure_future(one(body, stream, begin + at))
            pending.add(task)
            task.add_done_callback(pending.discard)
            result.sent += 1
            result.streamed += stream
            result.repeats += repeat
            sent_in_window[0] += 1
            at += rng.expovariate(args.rate)
        if pending:
            await asyncio.gather(*pending)
        if finished or sent_in_window[0]:  # a partial last window (duration not a multiple of the window)
            result.windows.append(close_window(len(result.windows), loop.time() - begin, last))
        result.wall_s = loop.time() - begin
    result.end = proc_snapshot(pid, t0)
    result.gateway_cpu_s = result.end.cpu_s - cpu0[0]
    result.client_cpu_s = time.process_time() - cpu0[1]
    result.errors = {k: v for k, v in sorted(result.errors.items()) if v}
    result.latency_ms = summarize(all_ok_ms)
    result.ttft_ms = summarize(all_ttft_ms)
    result.send_lag_ms = summarize(lags)
    result.settled, result.settle_s = await settle_fds(pid, t0, result.start.fds, args.settle_s)
    return result


def soak_report(r: SoakResult, f: Fleet, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    assert r.start is not None and r.end is not None and r.settled is not None
    windows = [w for w in r.windows if w.sent or w.completed]
    rows = [[w.index + 1, f"{w.end_t:.0f}", w.sent, w.completed, _kinds(w.errors), f"{w.latency_ms['p50']:.1f}",
             f"{w.latency_ms['p99']:.1f}", f"{w.ttft_ms['p50']:.1f}", f"{w.ttft_ms['p99']:.1f}", f"{w.rss_mib:.1f}",
             w.fds, f"{w.gateway_cores:.2f}", f"{w.client_cores:.2f}", f"{w.send_lag_p99_ms:.0f}",
             f"{w.load_avg:.1f}"] for w in windows]  # fmt: skip
    table = markdown_table(["window", "t (s)", "sent", "done", "errors", "p50 ms", "p99 ms", "TTFT p50 ms",
                            "TTFT p99 ms", "gateway RSS MiB", "gateway fds", "gateway cores", "client cores",
                            "client send lag p99 ms", "load avg"], rows)  # fmt: skip
    rss = [(w.end_t, w.rss_mib) for w in windows]
    fds = [(w.end_t, float(w.fds)) for w in windows]
    half = [w for w in windows if w.end_t > r.duration_s / 2]
    rss_slope, fds_slope = slope_per_hour(rss), slope_per_hour(fds)
    rss_slope2 = slope_per_hour([(w.end_t, w.rss_mib) for w in half])
    fds_slope2 = slope_per_hour([(w.end_t, float(w.fds)) for w in half])
    errors_total = sum(r.errors.values())
    first = windows[0] if windows else None
    summary = markdown_table(["measure", "value"], [
        ["requests sent / ok", f"{r.sent} / {r.sent - errors_total}"],
        ["streamed / repeating an earlier prefix", f"{r.streamed} / {r.repeats}"],
        ["errors by kind", _kinds(r.errors)],
        ["latency p50 / p90 / p99 / max (ms, to the last byte)",
         f"{r.latency_ms['p50']:.1f} / {r.latency_ms['p90']:.1f} / {r.latency_ms['p99']:.1f} / {r.latency_ms['max']:.1f}"],
        ["streams' TTFT p50 / p99 (ms)", f"{r.ttft_ms['p50']:.1f} / {r.ttft_ms['p99']:.1f}"],
        ["gateway RSS (MiB): start / first window / end / settled",
         f"{r.start.rss_mib:.1f} / {first.rss_mib if first else float('nan'):.1f} / {r.end.rss_mib:.1f} / {r.settled.rss_mib:.1f}"],
        ["gateway open fds: start / first window / end / settled",
         f"{r.start.fds} / {first.fds if first else '-'} / {r.end.fds} / {r.settled.fds}"],
        ["RSS slope (MiB/hour): whole run / second half", f"{rss_slope:.2f} / {rss_slope2:.2f}"],
        ["fds slope (per hour): whole run / second half", f"{fds_slope:.2f} / {fds_slope2:.2f}"],
        ["gateway CPU (ms per request; cores)",
         f"{r.gateway_cpu_s * 1000 / max(1, r.sent):.2f}; {r.gateway_cpu_s / max(1e-9, r.wall_s):.2f}"],
        ["client CPU (cores); send lag p99 (ms)",
         f"{r.client_cpu_s / max(1e-9, r.wall_s):.2f}; {r.send_lag_ms['p99']:.1f}"],
    ])  # fmt: skip
    notes = [
        f"Fake engines: {len(f.engine_urls)}; {'; '.join(f.notes)}.",
        f"Load: Poisson at {r.rate:g} req/s for {r.duration_s:g} s (ran {r.wall_s:.0f} s), chats of ~"
        f"{args.soak_prompt_tokens} tokens, {args.stream_fraction:.0%} streamed, {args.repeat_fraction:.0%} the "
        f"next turn of a recent conversation; each answer {args.soak_tokens} tokens {args.soak_inter_token_ms:g} ms "
        f"apart (streamed or not, the engine takes {(args.soak_tokens - 1) * args.soak_inter_token_ms / 1000:g} s); "
        f"client pool of up to {args.connections} keep-alive connections, timeout {args.timeout_s:g} s.",
        f"Gateway: policy {f.policy}, the defaults otherwise"
        + (f"; set for the test: {', '.join(r.changed)}" if r.changed else " (no server limit exists to raise)") + ".",
        f"Windows of {args.window_s:g} s; a request counts in the window it finished in; RSS and fds at the "
        "window's end. Settled: after the client closed its pool and the gateway's idle upstream connections expired. "
        "A window with a high client send lag or load average measured a busy machine (this client starved too).",
        f"Machine: {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f}.",
    ]  # fmt: skip
    body = "\n\n".join([summary, "### Per window\n\n" + table, "\n".join(f"- {n}" for n in notes)])
    data = {
        "mode": "soak", "args": vars(args), "sent": r.sent, "streamed": r.streamed, "repeats": r.repeats,
        "errors": r.errors, "latency_ms": r.latency_ms, "ttft_ms": r.ttft_ms, "send_lag_ms": r.send_lag_ms,
        "gateway": {"start": asdict(r.start), "end": asdict(r.end), "settled": asdict(r.settled),
                    "settle_s": r.settle_s, "cpu_s": r.gateway_cpu_s},
        "slope_per_hour": {"rss_mib": rss_slope, "fds": fds_slope, "rss_mib_second_half": rss_slope2,
                           "fds_second_half": fds_slope2},
        "client_cpu_s": r.client_cpu_s, "wall_s": r.wall_s, "changed": r.changed, "notes": notes,
        "windows": [asdict(w) for w in r.windows],
    }  # fmt: skip
    return body, data


def plot_soak(r: SoakResult, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    windows = [w for w in r.windows if w.sent or w.completed]
    minutes = [w.end_t / 60 for w in windows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax1.plot(minutes, [w.latency_ms["p50"] for w in windows], "-o", markersize=3, label="p50")
    ax1.plot(minutes, [w.latency_ms["p99"] for w in windows], "-o", markersize=3, label="p99")
    ax1.set_ylabel("latency (ms)")
    ax1.legend(fontsize=7)
    ax2.plot(minutes, [w.rss_mib for w in windows], color="C3")
    ax2.set_ylabel("gateway RSS (MiB)")
    ax3.plot(minutes, [w.fds for w in windows], color="C4")
    ax3.set_ylabel("gateway open fds")
    ax3.set_xlabel("time (min)")
    errors = [w for w in windows if w.errors]
    if errors:
        ax1.plot([w.end_t / 60 for w in errors], [w.latency_ms["p99"] for w in errors], "rx", markersize=10,
                 label="errors")  # fmt: skip
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Soak: {r.rate:g} req/s for {r.duration_s / 60:g} min through the gateway")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_soak(args: argparse.Namespace, f: Fleet) -> tuple[str, dict[str, Any], Callable[[Path], bool]]:
    with gateway(f) as (url, pid, changed):
        result: SoakResult = run_loop(soak_phase(args, f, url, pid))
    result.changed = changed
    body, data = soak_report(result, f, args)
    return body, data, lambda path: plot_soak(result, path)


# ---------------------------------------------------------------------------------------------
# Reports and main
# ---------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    return plt


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    return value


def save(mode: str, title: str, body: str, data: dict[str, Any], plot: Callable[[Path], bool],
         directory: Path) -> list[Path]:  # fmt: skip
    """The markdown report, its JSON and its plot (when matplotlib is there), one stem."""
    path = write_report(f"load-{mode}", title, body, directory)
    png = path.with_suffix(".png")
    if plot(png):
        path.write_text(path.read_text() + f"\n![samples]({png.name})\n")
    path.with_suffix(".json").write_text(json.dumps(_json_safe(data), indent=1, default=str) + "\n")
    return [p for p in (path, path.with_suffix(".json"), png) if p.exists()]


TITLES = {"streams": "Concurrent streams through the gateway", "soak": "Soak: a steady load through the gateway"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("modes", nargs="+", choices=["streams", "soak"], help="what to run, in order")
    parser.add_argument("--engines", type=int, default=2, help="fake engines (each its own process)")
    parser.add_argument("--engine-url", action="append", default=[],
                        help="use this running fake engine instead of starting them (repeatable)")
    parser.add_argument("--policy", default="prefix", help="the gateway's routing policy")
    parser.add_argument("--gateway-nofile", type=int,
                        help="start the gateway with this soft open-file limit (as systemd's 1024), not ours")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the scheduler")
    parser.add_argument("--settle-s", type=float, default=75.0,
                        help="at most this long for the gateway's fds to come back after the load")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    parser.add_argument("--no-report", action="store_true", help="print only; no file under bench/reports")
    streams = parser.add_argument_group("streams")
    streams.add_argument("--streams", type=int, default=5000, help="concurrent streams")
    streams.add_argument("--ramp-s", type=float, default=50.0,
                         help="seconds over which they are opened (25: the gateway's core saturates, see docs/reliability.md)")
    streams.add_argument("--hold-s", type=float, default=10.0, help="seconds all of them stay open at once")
    streams.add_argument("--inter-token-ms", type=float, default=1000.0, help="the engines' pace per stream")
    streams.add_argument("--prompt-tokens", type=int, default=200, help="the shared system prompts' size")
    streams.add_argument("--groups", type=int, default=50, help="distinct shared system prompts")
    streams.add_argument("--sample-s", type=float, default=1.0)
    streams.add_argument("--connect-timeout-s", type=float, default=30.0)
    streams.add_argument("--read-timeout-s", type=float, default=60.0, help="longest silence within a stream")
    soak = parser.add_argument_group("soak")
    soak.add_argument("--rate", type=float, default=50.0, help="requests per second (Poisson)")
    soak.add_argument("--duration-s", type=float, default=1800.0)
    soak.add_argument("--window-s", type=float, default=60.0)
    soak.add_argument("--stream-fraction", type=float, default=0.5)
    soak.add_argument("--repeat-fraction", type=float, default=0.5)
    soak.add_argument("--soak-prompt-tokens", type=int, default=1024)
    soak.add_argument("--soak-tokens", type=int, default=16, help="completion tokens per answer")
    soak.add_argument("--soak-inter-token-ms", type=float, default=20.0)
    soak.add_argument("--connections", type=int, default=256, help="the client's keep-alive pool")
    soak.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # Per stream: the client's connection; the gateway's to the client and to an engine.
    wanted = 2 * args.streams + 1024 if "streams" in args.modes else 4096
    try:
        with fleet(args, wanted) as f:
            for mode in args.modes:
                body, data, plot = (run_streams if mode == "streams" else run_soak)(args, f)
                out = f"## {TITLES[mode]}\n\n{body}"
                if not args.no_report:
                    files = save(mode, TITLES[mode], body, data, plot, args.report_dir)
                    out += "\n\n" + "\n".join(f"report: {p}" for p in files)
                print(out + "\n", flush=True)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
