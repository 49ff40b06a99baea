"""The gateway's listening socket, handed to its event loop as several.

libuv, under uvloop, accepts one connection per pass of the event loop (libuv 1.45+: "don't
accept() connections in a loop"). A pass takes tens of microseconds while the gateway keeps
up, so that limit never shows, but a worker at capacity runs passes of several milliseconds,
and a crowd of clients connecting then (a traffic spike: new clients, or the old ones opening
more connections) waits in the kernel's accept queue, one connection per pass, unseen by
admission control (gateway.limits.admission), which would have refused the excess at once.
Measured, one worker offered 2,000 req/s of 2k-token chats against ~1,100 it serves: the
client opened 350 connections in its first 0.45 s; the worker accepted one per 8-15 ms pass,
and requests on the last ones waited 0.6 s before a byte of them was read.

So the loop polls `ACCEPTS_PER_PASS` descriptors of the same socket (`dup`), each accepting one
connection per pass. Cost: a new connection wakes all of them, and all but one find nothing to
accept (one `accept4` each, ~3 µs): a `/health` on a new connection took 313-353 µs of the
worker's CPU against 273-293 with one descriptor. Connections the clients keep open cost nothing.
"""

from __future__ import annotations

import socket

import uvicorn

# Connections one worker accepts per pass of its loop: at capacity, passes of ~10 ms accept
# 1,600 connections a second.
ACCEPTS_PER_PASS = 16


def listening_sockets(sock: socket.socket, accepts_per_pass: int = ACCEPTS_PER_PASS) -> list[socket.socket]:
    """`sock` and `accepts_per_pass - 1` duplicates of it: what to pass as uvicorn's `sockets`."""
    return [sock, *(sock.dup() for _ in range(accepts_per_pass - 1))]


def bind(config: uvicorn.Config) -> list[socket.socket]:
    """uvicorn's listening socket for `config`, bound now, as `listening_sockets`."""
    return listening_sockets(config.bind_socket())
