"""Fake vLLM engines for unit tests of the whole app: `/tokenize` uses the real tiny-model
tokenizer, so "equal to the engine's token ids" is real; inference answers a fixed body."""

from __future__ import annotations

import json

import httpx

from gateway.tokenization.tokenizer import HFPromptTokenizer
from tests.unit.test_proxy import engine_json

METRICS = """# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="%d",num_gpu_blocks="640"} 1.0
"""


class Engines:
    """Engines a and b serving models "m" (and "n" when asked), with the tiny model's files
    as their `root`. `shift` makes /tokenize disagree; `broken` models answer 500 there."""

    def __init__(self, tokenizer: HFPromptTokenizer, root: str, models: tuple[str, ...] = ("m",)) -> None:
        self.tokenizer = tokenizer
        self.root = root
        self.models = models
        self.block_size = 32
        self.shift = 0
        self.broken: set[str] = set()
        self.paths: list[str] = []
        self.sent: list[bytes] = []  # bodies of the inference requests
        self.sent_headers: list[httpx.Headers] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(path)
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            cards = [{"id": m, "object": "model", "root": self.root, "parent": None} for m in self.models]
            return httpx.Response(200, json={"object": "list", "data": cards})
        if path == "/metrics":
            return httpx.Response(200, text=METRICS % self.block_size)
        if path == "/kv_event_sources":
            return httpx.Response(200, json={})
        if path.endswith("/render"):
            return httpx.Response(403, json={"error": {"message": "Scale-out endpoints are disabled."}})
        body = json.loads(request.content)
        if path == "/tokenize":
            if body["model"] in self.broken:
                return httpx.Response(500, json={"error": {"message": "boom"}})
            api = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            ids = self.tokenizer.token_ids_sync(api, body) or []
            return httpx.Response(200, json={"tokens": [i + self.shift for i in ids], "count": len(ids)})
        self.sent.append(request.content)
        self.sent_headers.append(request.headers)
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}}
        return engine_json(200, {"object": "text_completion", "choices": [], "usage": usage})

    def asked(self, path: str) -> int:
        return sum(1 for p in self.paths if p == path)
