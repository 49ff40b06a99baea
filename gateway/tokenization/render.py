"""Token ids from the engine itself: vLLM's /v1/chat/completions/render and
/v1/completions/render return exactly what the engine would compute (needs vLLM started with
--enable-scale-out). One extra hop per request; used when no local tokenizer is configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from gateway.endpoints.registry import Endpoint
from gateway.tokenization.tokenizer import CHAT_PATH, COMPLETIONS_PATH

logger = logging.getLogger(__name__)


class EngineRenderTokenizer:
    # After an engine refuses /render (403 without --enable-scale-out, 404 on old vLLM), stop
    # asking for this long: otherwise every request pays a useless extra hop.
    REFUSED_COOLDOWN_S = 300.0

    def __init__(self, client: httpx.AsyncClient, pick_endpoint: Callable[[], Endpoint | None],
                 timeout_s: float = 2.0) -> None:  # fmt: skip
        self._client = client
        self._pick_endpoint = pick_endpoint
        self._timeout_s = timeout_s
        self._warned = False
        self._refused_until = 0.0

    async def token_ids(self, api_path: str, body: dict[str, Any]) -> list[int] | None:
        if api_path not in (CHAT_PATH, COMPLETIONS_PATH) or time.monotonic() < self._refused_until:
            return None
        endpoint = self._pick_endpoint()
        if endpoint is None:
            return None
        render = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        try:
            resp = await self._client.post(f"{endpoint.url}{api_path}/render", json=render, timeout=self._timeout_s)
            if resp.status_code in (403, 404, 405):
                self._refused_until = time.monotonic() + self.REFUSED_COOLDOWN_S
            if resp.status_code != 200:
                self._warn(f"engine {endpoint.id} answered {resp.status_code} to render")
                return None
            data = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._warn(f"render on engine {endpoint.id} failed: {exc}")
            return None
        if isinstance(data, list):  # completions render returns one entry per prompt
            data = data[0] if data else {}
        token_ids = data.get("token_ids") if isinstance(data, dict) else None
        return list(token_ids) if isinstance(token_ids, list) else None

    def _warn(self, message: str) -> None:
        # Once: a fleet without --enable-scale-out would otherwise log on every request.
        if not self._warned:
            self._warned = True
            logger.warning("%s; routing without prefix knowledge for such requests", message)
