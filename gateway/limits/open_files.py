"""Open files (RLIMIT_NOFILE): raised at start-up, and the connection caps fitted to it.

A worker that runs out of file descriptors fails everyone: `accept` fails, and so does every
upstream connection, health check and KV-event socket. Each admitted request holds two
sockets (the client's and the engine's), and the upstream pool keeps up to as many idle
ones for reuse; every open client connection holds one. So a worker needs about

    max_connections + 2 × max_concurrent_requests + reserve

descriptors, the reserve covering what a worker holds whatever its load (the listening
socket, logs, the shared state file, the control client's pool of up to 100 connections,
and per engine its KV-event sockets and health checks). Where the limit is lower, both caps
are lowered in proportion and the log says so: refusing the excess is what the caps are for.
"""

from __future__ import annotations

import logging
import resource

from gateway.config import LimitsConfig

logger = logging.getLogger(__name__)

# Measured: a gateway in front of 2 engines, idle after 20 requests, held 19 descriptors (36
# per worker with `server.workers`: the multiprocess metrics files); the control client
# (httpx: health checks, engine tokenizing, KV transfers) may open up to 100 more under load.
RESERVED_FDS = 160
# A ZMQ subscription takes several descriptors (socket, its I/O thread's poller and signals),
# plus a replay socket and the health checker's connection.
FDS_PER_ENGINE = 8
UNLIMITED = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (workers inherit it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED
    # An unlimited hard limit (macOS) is no soft limit for files: ask for a large finite one.
    target = UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft >= target:
        logger.info("open-file limit: %d", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("open-file limit stays %d: raising it to %d failed (%s)", soft, target, exc)
        return soft
    logger.info("open-file limit raised from %d to %d (the hard limit)", soft, target)
    return target


def fds_needed(limits: LimitsConfig, engines: int) -> int:
    return limits.max_connections + 2 * limits.max_concurrent_requests + RESERVED_FDS + FDS_PER_ENGINE * engines


def fit_to_open_files(limits: LimitsConfig, open_files: int, engines: int) -> LimitsConfig:
    """`limits` with `max_connections` and `max_concurrent_requests` lowered, in proportion,
    until a worker's descriptors fit in `open_files`."""
    needed = fds_needed(limits, engines)
    if needed <= open_files:
        return limits
    room = open_files - RESERVED_FDS - FDS_PER_ENGINE * engines
    scale = max(room, 0) / (limits.max_connections + 2 * limits.max_concurrent_requests)
    requests = max(1, int(limits.max_concurrent_requests * scale))
    connections = max(requests, int(limits.max_connections * scale))
    logger.warning(
        "the open-file limit (%d) leaves room for %d connections and %d concurrent requests per worker, "
        "not limits.max_connections=%d and limits.max_concurrent_requests=%d (%d descriptors): raise the "
        "hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) to serve more",
        open_files, connections, requests, limits.max_connections, limits.max_concurrent_requests, needed,
    )  # fmt: skip
    return limits.model_copy(update={"max_connections": connections, "max_concurrent_requests": requests})
