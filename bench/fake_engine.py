"""A fake vLLM OpenAI server that answers in microseconds, so a router's own cost dominates.

    python -m bench.fake_engine --port 8101 [--model tiny-llama] [--tokenizer DIR] [--host 127.0.0.1]
                                [--tokens 3] [--inter-token-ms 0]

What it serves (everything a router in front of vLLM asks for):

- `GET /health` (200, empty), `GET /v1/models` (one model whose `root` is the tokenizer
  directory), `GET /metrics` (Prometheus text: `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:cache_config_info` with
  block_size 32 and num_gpu_blocks 100000, `process_start_time_seconds`), `GET /kv_event_sources`
  (`{}`: no KV-event stream).
- `POST /tokenize`: the real token ids of the tiny model's tokenizer, the chat template applied
  to `messages` exactly as `gateway.tokenization.tokenizer.HFPromptTokenizer` does (it is reused),
  so a gateway's check of its local tokenizer against the engine passes.
- `POST /v1/chat/completions`, `POST /v1/completions`: a fixed three-token answer. The body is
  JSON-decoded (for `stream`, `stream_options.include_usage`) and nothing more: the prompt is
  never read; `usage.prompt_tokens` is the body size / 4, `cached_tokens` is always 0.
  Streamed: three SSE chunks, a usage chunk when `stream_options.include_usage`, `data: [DONE]`,
  as HTTP/1.1 chunked transfer encoding, each event its own chunk, all written at once.
- A decoding engine, for load tests (`--tokens N --inter-token-ms M`, or per request the
  headers `x-fake-tokens` / `x-fake-inter-token-ms`): N completion tokens; with M > 0 a stream
  sends its first token at once and one more every M ms (it lasts (N-1)·M ms, the usage
  chunk and `[DONE]` come with the last token), and a non-streamed answer comes whole after
  (N-1)·M ms. A client that leaves stops its stream. `/metrics` then reports the answers in
  progress as `vllm:num_requests_running`, and `fake_engine_active_responses`,
  `fake_engine_peak_active_responses`, `fake_engine_open_connections`,
  `fake_engine_aborted_responses_total` (client gone before the end).
- vLLM's prefill/decode flow (NixlConnector): a completion with `kv_transfer_params.do_remote_decode`
  is a prefill: one token, not streamed, with `kv_transfer_params` naming this engine as the
  one to pull from (`remote_engine_id` `fake-<pid>`); one with `do_remote_prefill` is
  answered as any other (nothing is pulled).
- Anything else: 404 `{"detail": "Not Found"}` (FastAPI's shape: a router probing `/render`
  learns the engine has no such route).

Why a raw `asyncio.Protocol` with a small HTTP/1.1 parser on uvloop (when installed): each
request is parsed and answered inside `data_received`, with no task, no ASGI scope and no
framework, about 20-40 µs of CPU for a small request (uvicorn + an ASGI app is several times
that). It speaks keep-alive, pipelining, `Content-Length` request bodies (what every HTTP
client sends for a JSON body); a chunked request body is answered 411.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY = 64 * 1024 * 1024
ANSWER = ["ok", " ok", " ok"]  # the three completion tokens
TOKENS_HEADER = b"x-fake-tokens"
INTER_TOKEN_HEADER = b"x-fake-inter-token-ms"
Headers = Mapping[bytes, bytes] | None  # a request's pace overrides, lower-case names

_STATUS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           411: b"Length Required", 413: b"Payload Too Large"}  # fmt: skip
_NOT_FOUND = b'{"detail":"Not Found"}'


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def response_bytes(status: int, body: bytes, content_type: bytes = b"application/json", keep_alive: bool = True) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        status, _STATUS.get(status, b"Unknown"), content_type, len(body))  # fmt: skip
    if not keep_alive:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def chunked_response_bytes(events: list[bytes], keep_alive: bool = True) -> bytes:
    """An SSE response as HTTP/1.1 chunked transfer encoding, one chunk per event."""
    parts = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
             b"transfer-encoding: chunked\r\n"]  # fmt: skip
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    for event in events:
        parts.append(b"%x\r\n%s\r\n" % (len(event), event))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


@dataclass(slots=True)
class Paced:
    """A response written in parts over time, as a decoding engine sends it: `parts[0]` after
    `first_delay_s`, each next one `interval_s` later."""

    parts: list[bytes]
    interval_s: float
    first_delay_s: float = 0.0


def answer_tokens(count: int) -> list[str]:
    """`count` completion tokens: "ok", " ok", " ok", ..."""
    return [ANSWER[0], *[ANSWER[1]] * (max(1, count) - 1)]


class FakeEngine:
    """The answers, independent of the transport (tests call `handle` directly).

    `tokens` / `inter_token_s`: the default answer length and pace (module docstring)."""

    def __init__(self, model: str, tokenizer_dir: str, tokenizer: Any = None, tokens: int = len(ANSWER),
                 inter_token_s: float = 0.0) -> None:  # fmt: skip
        self.tokens = max(1, tokens)
        self.inter_token_s = max(0.0, inter_token_s)
        # Paced answers in progress, the most at once, those whose client left; open connections.
        self.active = 0
        self.peak_active = 0
        self.aborted = 0
        self.connections = 0
        self.model = model
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = tokenizer  # an HFPromptTokenizer, loaded by `load_tokenizer`
        self._counter = 0
        self.start_time = time.time()
        self.requests = 0
        self._models = _dumps({"object": "list", "data": [{
            "id": model, "object": "model", "created": int(self.start_time), "owned_by": "vllm",
            "root": tokenizer_dir, "parent": None, "max_model_len": 131072, "permission": []}]})  # fmt: skip
        self._model_json = json.dumps(model)

    def load_tokenizer(self) -> None:
        from gateway.tokenization.tokenizer import HFPromptTokenizer

        self._tokenizer = HFPromptTokenizer(self.tokenizer_dir, local_files_only=True)

    # -- routing -------------------------------------------------------------------------

    def handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool = True,
               headers: Headers = None) -> bytes | Paced:  # fmt: skip
        """The full HTTP response for one request (`Paced`: in parts over time). `headers`:
        lower-case names; only the pace overrides are read."""
        self.requests += 1
        path = path.split(b"?", 1)[0]
        route = self._routes.get(path)
        if route is None:
            return response_bytes(404, _NOT_FOUND, keep_alive=keep_alive)
        want, handler = route
        if method != want:
            return response_bytes(405, b'{"detail":"Method Not Allowed"}', keep_alive=keep_alive)
        try:
            return handler(self, body, keep_alive, headers)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            return response_bytes(400, _dumps({"error": {"message": f"{type(exc).__name__}: {exc}",
                                                        "type": "BadRequestError", "code": 400}}), keep_alive=keep_alive)  # fmt: skip

    def _health(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes:
        return response_bytes(200, b"", keep_alive=keep_alive)

    def _models_route(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes:
        return response_bytes(200, self._models, keep_alive=keep_alive)

    def _kv_event_sources(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes:
        return response_bytes(200, b"{}", keep_alive=keep_alive)

    def _metrics(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes:
        return response_bytes(200, self.metrics_text().encode(), b"text/plain; version=0.0.4; charset=utf-8",
                              keep_alive=keep_alive)  # fmt: skip

    def metrics_text(self) -> str:
        labels = f'engine="0",model_name="{self.model}"'
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(self.active)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} 0.0\n"
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="32",num_gpu_blocks="100000"} 1.0\n'
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {self.start_time:.3f}\n"
            "# TYPE fake_engine_active_responses gauge\n"
            f"fake_engine_active_responses {self.active}\n"
            "# TYPE fake_engine_peak_active_responses gauge\n"
            f"fake_engine_peak_active_responses {self.peak_active}\n"
            "# TYPE fake_engine_open_connections gauge\n"
            f"fake_engine_open_connections {self.connections}\n"
            "# TYPE fake_engine_aborted_responses counter\n"
            f"fake_engine_aborted_responses_total {self.aborted}\n"
        )

    def _tokenize(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes:
        from gateway.tokenization.prompt import CHAT_PATH, TextPrompt, prompt_of

        if self._tokenizer is None:
            self.load_tokenizer()
        request = json.loads(body)
        if not isinstance(request, dict):
            raise ValueError("the body must be a JSON object")
        if "messages" in request:
            prompt = prompt_of(CHAT_PATH, request)
            if prompt is None:
                raise ValueError("messages must be a non-empty list")
            tokens = self._tokenizer.encode(prompt)
        elif isinstance(request.get("prompt"), str):
            if request.get("add_special_tokens", True):
                tokens = self._tokenizer.encode(TextPrompt(request["prompt"]))
            else:
                tokens = list(self._tokenizer._tokenizer.encode(request["prompt"], add_special_tokens=False))
        else:
            raise ValueError("give `messages` or a string `prompt`")
        return response_bytes(200, _dumps({"count": len(tokens), "max_model_len": 131072, "tokens": tokens,
                                           "token_strs": None}), keep_alive=keep_alive)  # fmt: skip

    def _chat(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes | Paced:
        return self._complete(body, keep_alive, chat=True, headers=headers)

    def _completions(self, body: bytes, keep_alive: bool, headers: Headers = None) -> bytes | Paced:
        return self._complete(body, keep_alive, chat=False, headers=headers)

    def _pace(self, headers: Headers) -> tuple[int, float]:
        tokens, interval = self.tokens, self.inter_token_s
        if headers:
            if TOKENS_HEADER in headers:
                tokens = max(1, int(headers[TOKENS_HEADER]))
            if INTER_TOKEN_HEADER in headers:
                interval = max(0.0, float(headers[INTER_TOKEN_HEADER]) / 1000)
        return tokens, interval

    def _complete(self, body: bytes, keep_alive: bool, *, chat: bool, headers: Headers = None) -> bytes | Paced:
        request = json.loads(body)  # the only look at the request: stream and its options
        if not isinstance(request, dict):
            raise ValueError("the body must be a JSON object")
        count, interval = self._pace(headers)
        params = request.get("kv_transfer_params")
        prefill = isinstance(params, dict) and bool(params.get("do_remote_decode"))
        if prefill:  # vLLM's prefill side of P/D: one token, whole
            count, interval, request["stream"] = 1, 0.0, False
        tokens = answer_tokens(count)
        self._counter += 1
        prompt_tokens = max(1, len(body) // 4)
        usage = (f'{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens + count},"completion_tokens":{count},'
                 f'"prompt_tokens_details":{{"cached_tokens":0}}}}')  # fmt: skip
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake{os.getpid()}x{self._counter}"
        head = f'{{"id":"{rid}","object":"{"chat.completion" if chat else "text_completion"}{{kind}}","created":{created},"model":{self._model_json},'
        if request.get("stream"):
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            events = sse_events(head.replace("{kind}", ".chunk" if chat else ""), chat, usage, include_usage, tokens)
            if interval > 0 and len(tokens) > 1:
                return paced_chunked_response(events, len(tokens), interval, keep_alive)
            return chunked_response_bytes(events, keep_alive)
        text = "".join(tokens)
        if chat:
            choice = (f'{{"index":0,"message":{{"role":"assistant","content":"{text}","reasoning_content":null,'
                      f'"tool_calls":[]}},"logprobs":null,"finish_reason":"length","stop_reason":null}}')  # fmt: skip
        else:
            choice = (f'{{"index":0,"text":"{text}","logprobs":null,"finish_reason":"length","stop_reason":null,'
                      f'"prompt_logprobs":null}}')  # fmt: skip
        extra = ""
        if prefill:
            extra = ',"kv_transfer_params":' + _dumps({
                "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": f"fake-{os.getpid()}",
                "remote_request_id": rid, "remote_block_ids": [[0]], "remote_host": "127.0.0.1", "remote_port": 0,
                "tp_size": 1}).decode()  # fmt: skip
        payload = f'{head.replace("{kind}", "")}"choices":[{choice}],"usage":{usage},"prompt_logprobs":null{extra}}}'
        whole = response_bytes(200, payload.encode(), keep_alive=keep_alive)
        if interval > 0 and len(tokens) > 1:
            return Paced([whole], interval, first_delay_s=interval * (len(tokens) - 1))
        return whole

    _routes: dict[bytes, tuple[bytes, Callable[[FakeEngine, bytes, bool, Headers], bytes | Paced]]] = {
        b"/health": (b"GET", _health),
        b"/v1/models": (b"GET", _models_route),
        b"/metrics": (b"GET", _metrics),
        b"/kv_event_sources": (b"GET", _kv_event_sources),
        b"/tokenize": (b"POST", _tokenize),
        b"/v1/chat/completions": (b"POST", _chat),
        b"/v1/completions": (b"POST", _completions),
    }


def sse_events(head: str, chat: bool, usage: str, include_usage: bool, tokens: list[str] = ANSWER) -> list[bytes]:
    """`data: ...\\n\\n` events: one chunk per token (three by default), the usage chunk if
    asked, `[DONE]`. `head` is the opening of every chunk object up to and including `"model":...,`."""
    events = []
    for i, token in enumerate(tokens):
        finish = '"length"' if i == len(tokens) - 1 else "null"
        if chat:
            delta = f'{{"role":"assistant","content":"{token}"}}' if i == 0 else f'{{"content":"{token}"}}'
            choice = f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}'
        else:
            choice = f'{{"index":0,"text":"{token}","logprobs":null,"finish_reason":{finish},"stop_reason":null}}'
        events.append(f'data: {head}"choices":[{choice}]}}\n\n'.encode())
    if include_usage:
        events.append(f'data: {head}"choices":[],"usage":{usage}}}\n\n'.encode())
    events.append(b"data: [DONE]\n\n")
    return events


def paced_chunked_response(events: list[bytes], tokens: int, interval_s: float, keep_alive: bool = True) -> Paced:
    """`chunked_response_bytes` in `tokens` parts: the head and the first token event, then
    one token event per part, the last part also carrying what follows the last token (the
    usage event, `[DONE]`, the end of the body)."""
    whole = chunked_response_bytes(events, keep_alive)
    head_end = whole.index(b"\r\n\r\n") + 4
    chunks = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    parts = [whole[:head_end] + chunks[0], *chunks[1 : tokens - 1], b"".join(chunks[tokens - 1 :]) + b"0\r\n\r\n"]
    return Paced(parts, interval_s)


class HTTPProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; every request answered in `data_received`, a
    `Paced` answer over time (the requests after it on the connection wait for its end)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._paced: Paced | None = None
        self._paced_next = 0
        self._paced_close = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self.engine.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.engine.connections -= 1
        if self._paced is not None:  # the client left mid-answer: the engine aborts it
            self._end_paced()
            self.engine.aborted += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._paced is None:
            self._process()

    def _process(self) -> None:
        buffer = self.buffer
        out: list[bytes] = []
        close = False
        paced: Paced | None = None
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:  # no header block that long
                    out.append(response_bytes(400, b'{"detail":"header too large"}', keep_alive=False))
                    close = True
                break
            lines = bytes(buffer[:end]).split(b"\r\n")
            try:
                method, path, version = lines[0].split(b" ", 2)
            except ValueError:
                out.append(response_bytes(400, b'{"detail":"bad request line"}', keep_alive=False))
                close = True
                break
            length = 0
            connection = b""
            chunked = False
            pace: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip() or 0)
                elif name == b"connection":
                    connection = value.strip().lower()
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == TOKENS_HEADER or name == INTER_TOKEN_HEADER:
                    pace[name] = value.strip()
            keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
            if chunked or length > MAX_BODY:
                out.append(response_bytes(411 if chunked else 413, b'{"detail":"unsupported body"}', keep_alive=False))
                close = True
                break
            if len(buffer) < end + 4 + length:
                break  # wait for the rest of the body
            body = bytes(buffer[end + 4 : end + 4 + length])
            del buffer[: end + 4 + length]
            answer = self.engine.handle(method, path, body, keep_alive, pace or None)
            if isinstance(answer, Paced):
                paced = answer
                self._paced_close = not keep_alive
                break
            out.append(answer)
            if not keep_alive:
                close = True
                break
        if self.transport is None:
            return
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if close:
            self.transport.close()
        elif paced is not None:
            self._start_paced(paced)

    def _start_paced(self, paced: Paced) -> None:
        engine = self.engine
        engine.active += 1
        engine.peak_active = max(engine.peak_active, engine.active)
        self._paced, self._paced_next = paced, 0
        if paced.first_delay_s > 0:
            self._timer = asyncio.get_running_loop().call_later(paced.first_delay_s, self._write_next)
        else:
            self._write_next()

    def _write_next(self) -> None:
        paced, transport = self._paced, self.transport
        if paced is None or transport is None:
            return
        transport.write(paced.parts[self._paced_next])
        self._paced_next += 1
        if self._paced_next < len(paced.parts):
            self._timer = asyncio.get_running_loop().call_later(paced.interval_s, self._write_next)
            return
        self._end_paced()
        if self._paced_close:
            transport.close()
        elif self.buffer:
            self._process()  # requests pipelined behind the paced answer

    def _end_paced(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._paced = None
        self.engine.active -= 1


async def serve(engine: FakeEngine, host: str, port: int, ready: Callable[[], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HTTPProtocol(engine), host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if ready is not None:
        ready()
    async with server:
        await stop.wait()


def run_loop(coro: Any) -> Any:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def default_tokenizer_dir() -> str:
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(ROOT / ".cache" / "tiny-llama"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="tiny-llama", help="the served model name")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the tiny model, built if missing)")
    parser.add_argument("--tokens", type=int, default=len(ANSWER), help="completion tokens per answer")
    parser.add_argument("--inter-token-ms", type=float, default=0.0,
                        help="pace of a streamed answer (0: all at once); a non-streamed one waits (tokens-1) times this")
    args = parser.parse_args(argv)
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    engine = FakeEngine(args.model, str(tokenizer_dir), tokens=args.tokens, inter_token_s=args.inter_token_ms / 1000)
    engine.load_tokenizer()  # before listening: /tokenize must answer at once when /health does
    run_loop(serve(engine, args.host, args.port,
                   ready=lambda: print(f"fake engine {args.model} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
