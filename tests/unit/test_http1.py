"""The gateway's HTTP/1.1 client against a server that writes exactly the bytes each test
needs: framing (length, chunked, until the connection closes), keep-alive reuse, and every
way a request can fail, on asyncio's loop and on uvloop (the gateway's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.proxy import http1

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    return asyncio.run if request.param == "asyncio" else uvloop.run


class Server:
    """Counts connections; `requests` holds each request's head and body as received."""

    def __init__(self, answer: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
        self._answer = answer
        self.num_connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.disconnects = 0
        self.url = ""

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.disconnects += 1
            return False
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.requests.append((head, await reader.readexactly(length)))
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        try:
            await self._answer(self, reader, writer)
        except ConnectionError:
            self.disconnects += 1
        finally:
            writer.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), b"".join(e + b"\r\n" for e in extra), body)


async def answer_each(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: every request on the connection gets its body echoed back."""
    while await server.read_request(reader):
        writer.write(ok(b"echo:" + server.requests[-1][1], b"x-seen: yes"))
        await writer.drain()


async def request(pool: http1.Http1Pool, url: str, body: bytes = b"{}", read_timeout_s: float = 5.0,
                  headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> http1.Http1Response:  # fmt: skip
    return await pool.request(url, "POST", path, headers or {"content-type": "application/json"}, body,
                              connect_timeout_s=2.0, read_timeout_s=read_timeout_s)  # fmt: skip


async def read_all(response: http1.Http1Response) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_a_response_with_a_length_is_read_and_its_connection_reused(run: Callable[..., None]) -> None:
    async def main() -> None:
        async with Server(answer_each) as server:
            pool = http1.Http1Pool()
            for n in range(3):
                response = await request(pool, server.url + "/base/", body=b'{"n": %d}' % n)
                assert response.status_code == 200 and response.header("x-seen") == "yes"
                assert await read_all(response) == b'echo:{"n": %d}' % n
            assert server.num_connections == 1
            head, _ = server.requests[0]
            assert head.startswith(b"POST /base/v1/chat/completions HTTP/1.1\r\n")
            assert b"\r\nhost: 127.0.0.1:" in head and b"\r\ncontent-length: 8\r\n" in head
            assert b"\r\ncontent-type: application/json\r\n" in head
            await pool.close()

    run(main())


def test_a_chunked_stream_is_handed_over_as_it_arrives(run: Callable[..., None]) -> None:
    first_read = asyncio.Event()

    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
                     b"7\r\ndata: 1\r\n")  # fmt: skip
        await writer.drain()
        await first_read.wait()  # the client has the first event before the rest is sent
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        await server.read_request(reader)  # the connection is kept for the next request

    async def main() -> None:
        async with Server(answer) as server:
            pool = http1.Http1Pool()
            response = await request(pool, server.url)
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"data: 1"
            first_read.set()
            assert [chunk async for chunk in chunks] == [b"data: 2"]
            await response.aclose()
            assert pool._take(http1.origin_of(server.url)) is not None
            await pool.close()

    run(main())


def test_a_body_without_a_length_ends_with_the_connection(run: Callable[..., None]) -> None:
    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")

    async def main() -> None:
        async with Server(answer) as server:
            pool = http1.Http1Pool()
            assert await read_all(await request(pool, server.url)) == b"part one, part two"
            assert await read_all(await request(pool, server.url)) == b"part one, part two"
            assert server.num_connections == 2  # "connection: close": never reused
            await pool.close()

    run(main())


def test_an_interim_response_is_skipped(run: Callable[..., None]) -> None:
    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"done"))
        await server.read_request(reader)

    async def main() -> None:
        async with Server(answer) as server:
            pool = http1.Http1Pool()
            response = await request(pool, server.url)
            assert response.status_code == 200 and await read_all(response) == b"done"
            await pool.close()

    run(main())


def test_failures_before_an_answer_say_how_far_the_request_got(run: Callable[..., None]) -> None:
    async def hang_up(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async def say_nothing(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()  # until the client gives up and closes
        server.disconnects += 1

    async def main() -> None:
        pool = http1.Http1Pool()
        async with Server(hang_up) as server:
            with pytest.raises(http1.ClosedEarly):
                await request(pool, server.url)
            url = server.url
        with pytest.raises(http1.ConnectFailed):  # nothing listens there any more
            await request(pool, url)
        async with Server(say_nothing) as server:
            with pytest.raises(http1.ReadTimedOut):
                await request(pool, server.url, read_timeout_s=0.2)
            await until(lambda: server.disconnects == 1)  # the client closed the connection
            with pytest.raises(http1.RequestInvalid):
                await request(pool, server.url, headers={"x-a": "1\r\nx-smuggled: 2"})
            assert len(server.requests) == 1  # the refused one was never sent
        await pool.close()

    run(main())


def test_a_connection_dropped_mid_body_fails_after_the_bytes_that_came(run: Callable[..., None]) -> None:
    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async def main() -> None:
        async with Server(answer) as server:
            pool = http1.Http1Pool()
            response = await request(pool, server.url)
            received = []
            with pytest.raises(http1.ResponseBroken):
                async for chunk in response.aiter_raw():
                    received.append(chunk)
            assert b"".join(received) == b"only this"
            await response.aclose()
            await pool.close()

    run(main())


def test_a_response_closed_before_its_end_closes_its_connection(run: Callable[..., None]) -> None:
    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()

    async def main() -> None:
        async with Server(answer) as server:
            pool = http1.Http1Pool()
            response = await request(pool, server.url)
            assert await anext(response.aiter_raw()) == b"first"
            await response.aclose()  # the rest never read: the server sees the disconnect
            await response.aclose()  # twice is once
            await until(lambda: server.disconnects == 1)
            response = await request(pool, server.url)
            await response.aclose()
            assert server.num_connections == 2
            await pool.close()

    run(main())


def test_idle_connections_are_reused_only_while_fresh(run: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "IDLE_S", 0.5)

    async def main() -> None:
        async with Server(answer_each) as server:
            pool = http1.Http1Pool()
            await read_all(await request(pool, server.url))
            await read_all(await request(pool, server.url))  # a few ms later: the same connection
            assert server.num_connections == 1
            # No request comes to find it stale: the pool's sweep closes it (its socket freed).
            await until(lambda: server.disconnects == 1)
            await read_all(await request(pool, server.url))
            assert server.num_connections == 2
            await pool.close()
            await until(lambda: server.disconnects == 2)

    run(main())


def test_a_reader_that_falls_behind_pauses_the_socket(run: Callable[..., None]) -> None:
    size = 8 * 1024 * 1024
    drained = asyncio.Event()

    async def answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size)
        await writer.drain()
        drained.set()

    async def main() -> None:
        async with Server(answer) as server:
            pool = http1.Http1Pool()
            response = await request(pool, server.url)
            await until(lambda: response._paused)
            # A window for the buffer to keep growing had reading not stopped: it stays within
            # the bound plus what was in flight (one read of the socket, at most 256 KiB).
            await asyncio.sleep(0.3)
            assert response._num_buffered_bytes <= http1.MAX_BUFFERED_BYTES + 256 * 1024
            assert not drained.is_set()
            assert len(await read_all(response)) == size
            await pool.close()

    run(main())
