"""The NIXL pull flow's HTTP side against fake engines: what each step sends, and every way it
can fail turning into a KVTransferError (the gateway then recomputes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from engine_adapter.transfer.nixl import EngineAddress, KVTransferError, NixlPullTransfer

PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e-a",
          "remote_block_ids": [1, 2, 3], "remote_host": "127.0.0.1", "remote_port": 5600}  # fmt: skip
HOLDER, TARGET = EngineAddress("http://holder", api_key="k-a"), EngineAddress("http://target")


def completion(params: object = None) -> httpx.Response:
    return httpx.Response(200, json={"object": "text_completion", "choices": [{"text": "x"}], "kv_transfer_params": params})


def run(handler: Callable[[httpx.Request], httpx.Response], prefix: list[int], timeout_s: float = 5.0) -> object:
    async def go() -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await NixlPullTransfer(client).transfer(HOLDER, TARGET, "m", prefix, timeout_s=timeout_s, request_id="r1")

    return asyncio.run(go())


def test_prepare_then_pull_with_the_holders_params_and_the_same_prompt() -> None:
    seen: list[tuple[str, dict[str, object], httpx.Headers]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, json.loads(request.content), request.headers))
        return completion(PARAMS if request.url.host == "holder" else None)

    timings = run(handler, list(range(64)))
    (h_host, h_body, h_headers), (t_host, t_body, t_headers) = seen
    assert (h_host, t_host) == ("holder", "target")
    assert h_body["prompt"] == t_body["prompt"] == list(range(64))
    assert h_body["max_tokens"] == t_body["max_tokens"] == 1
    assert h_body["kv_transfer_params"]["do_remote_decode"] is True  # type: ignore[index]
    assert t_body["kv_transfer_params"] == PARAMS
    assert h_headers["authorization"] == "Bearer k-a" and "authorization" not in t_headers
    assert h_headers["x-request-id"] != t_headers["x-request-id"]
    assert timings.total_s >= 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("stage", "holder", "target"),
    [
        ("prepare", lambda r: httpx.Response(503, json={"error": "busy"}), None),
        ("prepare", lambda r: completion(None), None),  # engine without NixlConnector
        ("prepare", lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)), None),
        ("pull", lambda r: completion(PARAMS), lambda r: httpx.Response(500, text="nixl read failed")),
        ("pull", lambda r: completion(PARAMS), lambda r: (_ for _ in ()).throw(httpx.ReadError("reset", request=r))),
        ("pull", lambda r: completion(PARAMS), lambda r: httpx.Response(200, text="not json")),
    ],
)
def test_failures_name_their_stage(stage: str, holder: Callable, target: Callable | None) -> None:  # type: ignore[type-arg]
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "holder":
            return holder(request)  # type: ignore[no-any-return]
        assert target is not None, "the pull must not run after a failed prepare"
        return target(request)  # type: ignore[no-any-return]

    with pytest.raises(KVTransferError) as info:
        run(handler, [1, 2, 3])
    assert info.value.stage == stage


def test_a_hanging_engine_is_cut_off_at_the_timeout() -> None:
    async def go() -> None:
        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.host == "target":
                await asyncio.sleep(10)
            return completion(PARAMS)

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await NixlPullTransfer(client).transfer(HOLDER, TARGET, "m", [1], timeout_s=0.2, request_id="r")

    with pytest.raises(KVTransferError) as info:
        asyncio.run(asyncio.wait_for(go(), 3))
    assert info.value.stage == "timeout"
