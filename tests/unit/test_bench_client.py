"""The load generator's client (bench/client.py) against a small server in the same loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from bench.client import Client

BODY = b'{"ok": true}'


class Server:
    """HTTP/1.1 keep-alive; the path says how to answer: /ok, /chunked, /wait (until `release`
    is set), /close (closes without answering)."""

    def __init__(self) -> None:
        self.num_connections = 0
        self.num_open = 0
        self.most_open = 0
        self.release = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        self.num_open += 1
        self.most_open = max(self.most_open, self.num_open)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ")[1]
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                await reader.readexactly(length)
                if path == b"/close":
                    break
                if path == b"/wait":
                    await self.release.wait()
                if path == b"/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
                else:
                    writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (
                        b"200 OK" if path != b"/missing" else b"404 Not Found", len(BODY), BODY))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.num_open -= 1
            writer.close()


def run(test: Callable[[Server, Client], Awaitable[None]], max_connections: int = 512) -> None:
    async def main() -> None:
        async with Server() as server, Client(max_connections=max_connections) as client:
            await test(server, client)

    asyncio.run(main())


def test_answers_are_read_whole_on_one_kept_alive_connection() -> None:
    async def test(server: Server, client: Client) -> None:
        outcomes = [await client.post(server.url, path, b'{"x": 1}', 2.0) for path in ("/ok", "/chunked", "/missing")]
        assert [status for status, _ in outcomes] == ["200", "200", "404"]
        assert (await client.get(server.url, "/ok", 2.0))[0] == "200"
        assert server.num_connections == 1

    run(test)


def test_no_more_connections_than_the_cap_and_the_rest_wait_for_one() -> None:
    async def test(server: Server, client: Client) -> None:
        requests = [asyncio.ensure_future(client.get(server.url, "/wait", 5.0)) for _ in range(6)]
        while server.num_open < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # time for a third connection, were one allowed
        assert server.num_open == 2 and not any(r.done() for r in requests)
        server.release.set()
        assert [status for status, _ in await asyncio.gather(*requests)] == ["200"] * 6
        assert server.most_open == 2

    run(test, max_connections=2)


def test_a_late_answer_is_a_timeout_at_the_limit_and_a_dropped_one_a_connection_error() -> None:
    async def test(server: Server, client: Client) -> None:
        status, seconds = await client.get(server.url, "/wait", 0.2)
        # Not before the limit; well before the 5 s another failure mode (no timer) would take.
        assert status == "timeout" and 0.2 <= seconds < 2.0
        assert (await client.get(server.url, "/close", 2.0))[0] == "conn"
        with socket.socket() as unused:  # a port nothing listens on
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        assert (await client.get(f"http://127.0.0.1:{port}", "/ok", 2.0))[0] == "conn"
        server.release.set()
        assert (await client.get(server.url, "/ok", 2.0))[0] == "200"  # the pool is still usable

    run(test)
