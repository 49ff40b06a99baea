"""Prefill/decode disaggregation against fake engines: which engines take each part, the two
requests' bodies, the fall-back to unified serving, cancellation, errors. (Real engines pulling
the KV over NIXL: tests/integration/test_disaggregation.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from engine_adapter.transfer.nixl import PREFILL_KV_PARAMS
from gateway.proxy.disaggregation import decode_body, prefill_body
from tests.harness import GatewayServer, gateway_config
from tests.unit.fake_engines import Engines
from tests.unit.test_proxy import engine_json

PROMPT = "The prefill engine computes this prompt and the decode engine pulls its KV. " * 12


class Stream(httpx.AsyncByteStream):
    """An engine's streamed body; closed unread (the gateway abandoning it), the engine's
    generator is closed too, as a real engine sees its connection close."""

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):  # "already running": its reader was cancelled
            await self._chunks.aclose()


class PDFleet:
    """Fake engines by host name; inference requests are answered as vLLM's P/D flow does:
    a `do_remote_decode` request gets `kv_transfer_params`, any other one an answer (streamed
    when asked). `hold_prefill` makes prefill requests wait; `slow_decode` paces streams."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (engine, body) of inference requests
        self.broken: dict[str, Callable[[httpx.Request], httpx.Response]] = {}
        self.hold_prefill = False
        self.slow_decode = False
        self.cancelled: list[str] = []  # engines whose request was abandoned by the gateway
        self.open_streams: dict[str, int] = {}

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path not in ("/v1/completions", "/v1/chat/completions"):
            return self.engines.handler(request)
        host = request.url.host
        body = json.loads(request.content)
        self.calls.append((host, body))
        if host in self.broken:
            return self.broken[host](request)
        params = body.get("kv_transfer_params") or {}
        if params.get("do_remote_decode"):
            return await self._prefill(host, body)
        return self._answer(host, body)

    async def _prefill(self, host: str, body: dict[str, Any]) -> httpx.Response:
        try:
            while self.hold_prefill:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.append(host)
            raise
        params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": f"engine-{host}",
                  "remote_block_ids": [[1, 2, 3]], "remote_request_id": "cmpl-p", "remote_host": host,
                  "remote_port": 5600, "tp_size": 1}  # fmt: skip
        usage = {"prompt_tokens": 120, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}}
        return engine_json(200, {"object": "text_completion", "choices": [{"text": "x"}], "usage": usage,
                                 "kv_transfer_params": params})  # fmt: skip

    def _answer(self, host: str, body: dict[str, Any]) -> httpx.Response:
        if not body.get("stream"):
            usage = {"prompt_tokens": 120, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0}}
            return engine_json(200, {"object": "text_completion", "choices": [{"text": f"from {host}"}], "usage": usage})

        slow = self.slow_decode

        async def events() -> AsyncGenerator[bytes, None]:
            self.open_streams[host] = self.open_streams.get(host, 0) + 1
            finished = False
            try:
                for number in range(1000 if slow else 3):
                    yield b'data: {"choices":[{"text":"t%d"}]}\n\n' % number
                    if slow:
                        await asyncio.sleep(0.05)
                yield b"data: [DONE]\n\n"
                finished = True
            finally:  # closed or cancelled before its end: abandoned
                self.open_streams[host] -= 1
                if not finished:
                    self.cancelled.append(host)

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Stream(events()))

    def engines_of(self, *, prefill: bool) -> list[str]:
        return [h for h, b in self.calls if bool((b.get("kv_transfer_params") or {}).get("do_remote_decode")) == prefill]


@pytest.fixture()
def fleet(engines: Engines) -> PDFleet:
    return PDFleet(engines)


def start(fleet: PDFleet, roles: dict[str, str], kv_transfer: bool = True, **sections: Any) -> GatewayServer:
    engines = [{"name": n, "url": f"http://{n}", "kv_transfer": kv_transfer, "role": r} for n, r in roles.items()]
    config = gateway_config(engines, health={"interval_s": 600}, **sections)
    return GatewayServer(config, transport=httpx.MockTransport(fleet.handler)).start()


@pytest.fixture()
def gateways() -> Iterator[list[GatewayServer]]:
    started: list[GatewayServer] = []
    yield started
    for gateway in started:
        gateway.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def ready(gateway: GatewayServer) -> GatewayServer:
    wait_until(lambda: gateway.metric("gateway_tokenizer_ready", model="m") == 1, "the tokenizer check")
    return gateway


def complete(gateway: GatewayServer, **extra: Any) -> httpx.Response:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 16, **extra}
    return httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)


# --- configuration ------------------------------------------------------------------------------


def test_prefill_and_decode_roles_need_kv_transfer() -> None:
    for role in ("prefill", "decode"):
        with pytest.raises(ConfigError, match=r"engines\.0: .*kv_transfer: true"):
            parse_config({"engines": [{"name": "a", "url": "http://a", "role": role}]})
    with pytest.raises(ConfigError, match="engines.0.role"):
        parse_config({"engines": [{"name": "a", "url": "http://a", "role": "decoder", "kv_transfer": True}]})
    assert parse_config({"engines": [{"name": "a", "url": "http://a"}]}).engines[0].role == "both"


# --- the two requests ---------------------------------------------------------------------------


def test_the_prefill_body_is_one_token_unstreamed_for_a_remote_decoder() -> None:
    client = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True},
              "max_completion_tokens": 50, "min_tokens": 5, "temperature": 0, "logprobs": True}  # fmt: skip
    assert prefill_body(client) == {
        "model": "m", "messages": [], "stream": False, "max_tokens": 1, "max_completion_tokens": 1, "temperature": 0,
        "logprobs": True, "kv_transfer_params": PREFILL_KV_PARAMS,
    }  # fmt: skip
    assert client["stream_options"] == {"include_usage": True}  # the client's body is left alone
    params = {"do_remote_prefill": True, "remote_engine_id": "e"}
    assert json.loads(decode_body(json.dumps(client).encode(), params)) == {**client, "kv_transfer_params": params}


def test_a_split_fleet_prefills_on_a_prefill_engine_and_decodes_on_a_decode_engine(
    fleet: PDFleet, gateways: list[GatewayServer]
) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    resp = complete(gateway, temperature=0, logprobs=1)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-gateway-engine"] == "d" and resp.headers["x-gateway-prefill-engine"] == "p"
    assert resp.json()["choices"][0]["text"] == "from d"
    (p_engine, p_body), (d_engine, d_body) = fleet.calls
    assert (p_engine, d_engine) == ("p", "d")
    assert p_body == {"model": "m", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                      "stream": False, "kv_transfer_params": PREFILL_KV_PARAMS}  # fmt: skip
    # The decode engine gets the client's request with what the prefill engine answered.
    assert d_body["max_tokens"] == 16 and "stream" not in d_body
    assert d_body["kv_transfer_params"]["remote_engine_id"] == "engine-p"
    assert d_body["kv_transfer_params"]["do_remote_prefill"] is True
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="complete") == 1
    assert gateway.metric("gateway_disaggregated_engine_requests_total", phase="prefill", engine="p") == 1
    assert gateway.metric("gateway_disaggregated_engine_requests_total", phase="decode", engine="d") == 1
    assert gateway.metric("gateway_requests_total", engine="d", status="200") == 1
    assert gateway.metric("gateway_disaggregated_prefill_duration_seconds_count", engine="p") == 1


def test_a_streamed_chat_request_streams_from_the_decode_engine(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_completion_tokens": 20}  # fmt: skip
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.count("data: ") == 4 and resp.text.endswith("data: [DONE]\n\n")
    (_, p_body), (_, d_body) = fleet.calls
    assert p_body["stream"] is False and "stream_options" not in p_body
    assert p_body["max_tokens"] == 1 and p_body["max_completion_tokens"] == 1
    assert d_body["stream"] is True and d_body["max_completion_tokens"] == 20 and "max_tokens" not in d_body
    assert d_body["stream_options"] == {"include_usage": True}  # the gateway's usage request, as unified
    assert d_body["kv_transfer_params"]["remote_host"] == "p"


def test_the_prefill_engine_is_the_policys_choice_and_the_decode_engine_the_least_loaded(
    fleet: PDFleet, gateways: list[GatewayServer]
) -> None:
    roles = {"p1": "prefill", "p2": "prefill", "d1": "decode", "d2": "decode"}
    gateways.append(gateway := ready(start(fleet, roles)))
    first = complete(gateway)
    holder = first.headers["x-gateway-prefill-engine"]
    assert holder in ("p1", "p2") and first.headers["x-gateway-engine"] in ("d1", "d2")
    # The prefix policy: the same prompt prefills where it was computed (the prefix is there).
    for _ in range(3):
        assert complete(gateway).headers["x-gateway-prefill-engine"] == holder
    assert set(fleet.engines_of(prefill=True)) == {holder}
    assert set(fleet.engines_of(prefill=False)) <= {"d1", "d2"}  # never a prefill-only engine
    # A long stream on one decode engine: the next requests decode on the other.
    fleet.slow_decode = True
    with httpx.stream("POST", f"{gateway.url}/v1/completions", timeout=30,
                      json={"model": "m", "prompt": PROMPT, "max_tokens": 999, "stream": True}) as busy:  # fmt: skip
        chunks = busy.iter_raw()  # kept: a dropped iterator closes the response
        next(chunks)
        busy_engine = busy.headers["x-gateway-engine"]
        fleet.slow_decode = False
        other = {"d1": "d2", "d2": "d1"}[busy_engine]
        for _ in range(3):
            assert complete(gateway).headers["x-gateway-engine"] == other


def explain(gateway: GatewayServer) -> dict[str, Any]:
    resp = httpx.post(f"{gateway.url}/debug/route", json={"model": "m", "prompt": PROMPT},
                      headers={"authorization": "Bearer admin"}, timeout=30)  # fmt: skip
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def test_debug_route_shows_both_parts_and_sends_nothing(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    roles = {"p": "prefill", "b": "both", "d": "decode"}
    gateways.append(gateway := ready(start(fleet, roles, server={"admin_token": "admin"})))
    for _ in range(3):
        parts = explain(gateway)["disaggregation"]
        assert parts["prefill"] in ("p", "b") and parts["decode"] in ("b", "d") and parts["decode"] != parts["prefill"]
    assert fleet.calls == []
    listed = httpx.get(f"{gateway.url}/admin/engines", headers={"authorization": "Bearer admin"}, timeout=30).json()
    assert {e["id"]: e["role"] for e in listed["engines"]} == roles


def test_without_a_split_requests_are_served_unified(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    gateways.append(gateway := ready(start(fleet, {"a": "both", "b": "both"}, server={"admin_token": "admin"})))
    assert explain(gateway)["disaggregation"] is None
    for _ in range(4):
        assert complete(gateway).status_code == 200
    assert len(fleet.calls) == 4
    assert all("kv_transfer_params" not in body for _, body in fleet.calls)
    assert gateway.metric("gateway_disaggregated_requests_total") == 0


@pytest.mark.parametrize("extra", [{"n": 2}, {"prompt_logprobs": 1}, {"echo": True, "logprobs": 0}],
                         ids=["n", "prompt_logprobs", "echo_logprobs"])  # fmt: skip
def test_requests_the_flow_cannot_split_are_served_unified(
    fleet: PDFleet, gateways: list[GatewayServer], extra: dict[str, Any]
) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    resp = complete(gateway, **extra)
    assert resp.status_code == 200 and "x-gateway-prefill-engine" not in resp.headers
    assert len(fleet.calls) == 1 and "kv_transfer_params" not in fleet.calls[0][1]


def test_a_both_engine_prefills_or_decodes(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    # b may take either part; p only prefills, so whatever p prefills decodes on b.
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "b": "both"})))
    for _ in range(4):
        resp = complete(gateway)
        assert resp.status_code == 200
        if resp.headers.get("x-gateway-prefill-engine") == "p":
            assert resp.headers["x-gateway-engine"] == "b"
        else:  # the prefill went to b, the only decoder: all of it there, unified
            assert resp.headers["x-gateway-engine"] == "b"
    assert "d" not in {h for h, _ in fleet.calls} and "p" not in fleet.engines_of(prefill=False)


# --- failures -----------------------------------------------------------------------------------


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(refuse, id="connection_refused"),
        pytest.param(lambda r: engine_json(500, {"error": {"message": "boom"}}), id="status_500"),
        pytest.param(lambda r: engine_json(503, {"error": {"message": "busy"}}), id="status_503"),
    ],
)
def test_a_failed_prefill_is_served_unified_on_a_healthy_engine(
    fleet: PDFleet, gateways: list[GatewayServer], failure: Callable[[httpx.Request], httpx.Response]
) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    fleet.broken["p"] = failure
    resp = complete(gateway)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from d"
    assert "x-gateway-prefill-engine" not in resp.headers
    assert [h for h, _ in fleet.calls] == ["p", "d"]
    assert "kv_transfer_params" not in fleet.calls[1][1]  # unified: the client's request as it came
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="prefill_failed") == 1
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="complete") == 0


def test_a_prefill_the_engine_refuses_as_a_bad_request_is_served_unified(
    fleet: PDFleet, gateways: list[GatewayServer]
) -> None:
    # Say the engine refuses the one-token version of the request (a 4xx): the request itself
    # is fine, so it is served unified, where either engine may take it.
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))

    def refuses_prefills(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "kv_transfer_params" in body:
            return engine_json(400, {"error": {"message": "min_tokens must be <= max_tokens", "code": 400}})
        return fleet._answer("p", body)

    fleet.broken["p"] = refuses_prefills
    for _ in range(2):
        resp = complete(gateway)
        assert resp.status_code == 200 and "x-gateway-prefill-engine" not in resp.headers
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="prefill_failed") == 2
    assert gateway.metric("gateway_engine_ejections_total") == 0  # not the engine's fault


def test_a_prefill_answer_without_kv_transfer_params_is_served_unified(
    fleet: PDFleet, gateways: list[GatewayServer]
) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    fleet.broken["p"] = lambda r: engine_json(200, {"object": "text_completion", "choices": [{"text": "x"}]})
    resp = complete(gateway)
    assert resp.status_code == 200
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="prefill_failed") == 1
    assert "kv_transfer_params" not in fleet.calls[-1][1]


def test_a_prefill_that_times_out_is_served_unified(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"}, proxy={"first_byte_timeout_s": 0.5})))
    fleet.hold_prefill = True
    started = time.monotonic()
    resp = complete(gateway)
    assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == "d"
    assert time.monotonic() - started < 5
    assert fleet.cancelled == ["p"]  # abandoned: the engine aborts it
    assert gateway.metric("gateway_upstream_timeouts_total", engine="p", kind="first_byte") == 1


def test_a_decode_engine_failing_before_its_first_byte_is_retried_unified(
    fleet: PDFleet, gateways: list[GatewayServer]
) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    fleet.broken["d"] = refuse
    resp = complete(gateway)
    assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == "p"
    assert [h for h, _ in fleet.calls] == ["p", "d", "p"]
    assert "kv_transfer_params" not in fleet.calls[2][1]
    assert gateway.metric("gateway_disaggregated_requests_total", outcome="decode_failed") == 1
    assert gateway.metric("gateway_upstream_retries_total", reason="connect_error") == 1


def test_the_decode_engines_error_reaches_the_client_as_unified(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    error = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "code": 400}}
    fleet.broken["d"] = lambda r: engine_json(400, error)
    resp = complete(gateway)
    assert resp.status_code == 400 and resp.json() == error
    assert resp.headers["x-gateway-engine"] == "d"


# --- cancellation ----------------------------------------------------------------------------------


def raw_request(gateway: GatewayServer, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    return sock


def test_the_client_leaving_during_the_prefill_cancels_it(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    fleet.hold_prefill = True
    sock = raw_request(gateway, {"model": "m", "prompt": PROMPT, "max_tokens": 16, "stream": True})
    wait_until(lambda: bool(fleet.calls), "the prefill request")
    sock.close()
    wait_until(lambda: fleet.cancelled == ["p"], "the prefill engine's request to be abandoned")
    wait_until(lambda: gateway.metric("gateway_disaggregated_requests_total", outcome="cancelled") == 1, "the metric")
    assert [h for h, _ in fleet.calls] == ["p"]  # the decode engine never got it
    assert gateway.metric("gateway_engine_in_flight", engine="p") == 0


def test_the_client_leaving_mid_stream_cancels_the_decode(fleet: PDFleet, gateways: list[GatewayServer]) -> None:
    gateways.append(gateway := ready(start(fleet, {"p": "prefill", "d": "decode"})))
    fleet.slow_decode = True
    with httpx.stream("POST", f"{gateway.url}/v1/completions", timeout=30,
                      json={"model": "m", "prompt": PROMPT, "max_tokens": 999, "stream": True}) as resp:  # fmt: skip
        chunks = resp.iter_raw()
        assert next(chunks).startswith(b"data: ")
        assert resp.headers["x-gateway-prefill-engine"] == "p"
    wait_until(lambda: fleet.cancelled == ["d"], "the decode stream to be closed")
    assert fleet.open_streams["d"] == 0
    wait_until(lambda: gateway.metric("gateway_disaggregated_requests_total", outcome="client_disconnected") == 1,
               "the metric")  # fmt: skip
    assert gateway.metric("gateway_engine_in_flight", engine="d") == 0
