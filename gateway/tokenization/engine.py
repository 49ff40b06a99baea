"""Token ids from the engines themselves, for models the gateway has no verified local
tokenizer for. Every vLLM server answers `POST /tokenize` (chat messages with the chat
template applied, or a prompt); servers started with `--enable-scale-out` also answer
`/v1/*/render`, which takes the very request body the API would take. Render is tried once
per engine and remembered; an engine that refuses it is asked `/tokenize` from then on. A
failure concerns one request or one engine, never the other models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from gateway.endpoints.registry import Endpoint
from gateway.tokenization.prompt import ChatPrompt, Prompt, TextPrompt, TokenPrompt, prompt_of
from gateway.tokenization.tokenizer import HeadIsEnough, PromptTokens, TokenizationFailed
from gateway.types import EngineId

logger = logging.getLogger(__name__)

# Request fields that change what /render computes: the rest (sampling, stream) it ignores
# or, for stream, refuses.
_NOT_RENDERED = frozenset({"stream", "stream_options"})


class EngineTokenizer:
    def __init__(
        self,
        client: httpx.AsyncClient,
        pick_endpoint: Callable[[str], Endpoint | None],
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self._client = client
        self._pick_endpoint = pick_endpoint
        self._timeout_s = timeout_s
        # engine -> whether it serves /render (absent: not asked yet).
        self._renders: dict[EngineId, bool] = {}

    async def prompt_tokens(
        self, model: str, api_path: str, body: dict[str, Any], enough: HeadIsEnough | None = None
    ) -> PromptTokens | None:
        """The whole prompt always: an engine has no cheaper answer for a head."""
        ids = await self.token_ids(model, api_path, body)
        return None if ids is None else PromptTokens(ids, len(ids))

    async def token_ids(self, model: str, api_path: str, body: dict[str, Any]) -> list[int] | None:
        prompt = prompt_of(api_path, body)
        if prompt is None:
            return None
        if isinstance(prompt, TokenPrompt):
            return prompt.token_ids
        endpoint = self._pick_endpoint(model)
        if endpoint is None:
            raise TokenizationFailed(f"no engine available to tokenize for model {model}")
        if self._renders.get(endpoint.id, True):
            token_ids = await self._render(endpoint, api_path, body)
            if token_ids is not None:
                return token_ids
        return await self.tokenize(endpoint, model, prompt)

    async def tokenize(self, endpoint: Endpoint, model: str, prompt: ChatPrompt | TextPrompt) -> list[int]:
        """The engine's `/tokenize` for `prompt` (served by every vLLM server)."""
        data = await self._post(endpoint, "/tokenize", prompt.tokenize_body(model))
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            raise TokenizationFailed(f"engine {endpoint.id}: /tokenize answered without tokens")
        return tokens

    def forget(self, engine: EngineId) -> None:
        """The engine (re)joined, maybe restarted with other flags: ask about /render again."""
        self._renders.pop(engine, None)

    async def _render(self, endpoint: Endpoint, api_path: str, body: dict[str, Any]) -> list[int] | None:
        """Token ids from /render, or None when this engine does not serve it."""
        render_body = {k: v for k, v in body.items() if k not in _NOT_RENDERED}
        try:
            resp = await self._client.post(
                f"{endpoint.url}{api_path}/render", json=render_body, headers=_auth(endpoint), timeout=self._timeout_s
            )
        except httpx.HTTPError as exc:
            raise TokenizationFailed(f"engine {endpoint.id}: render failed: {exc}") from None
        if _refused(resp):
            # 403 without --enable-scale-out; 404 Not Found / 405 where the route is missing.
            if endpoint.id not in self._renders:
                logger.info("engine %s does not serve /render (%d); tokenizing with /tokenize", endpoint.id,
                            resp.status_code)  # fmt: skip
            self._renders[endpoint.id] = False
            return None
        self._renders[endpoint.id] = True
        data = _json(resp, endpoint, "render")
        if isinstance(data, list):  # completions render returns one entry per prompt
            data = data[0] if data else {}
        token_ids = data.get("token_ids") if isinstance(data, dict) else None
        if not isinstance(token_ids, list):
            raise TokenizationFailed(f"engine {endpoint.id}: render answered without token_ids")
        return token_ids

    async def _post(self, endpoint: Endpoint, path: str, body: dict[str, Any]) -> Any:
        try:
            resp = await self._client.post(
                f"{endpoint.url}{path}", json=body, headers=_auth(endpoint), timeout=self._timeout_s
            )
        except httpx.HTTPError as exc:
            raise TokenizationFailed(f"engine {endpoint.id}: {path} failed: {type(exc).__name__} {exc}") from None
        return _json(resp, endpoint, path)


def _refused(resp: httpx.Response) -> bool:
    if resp.status_code in (403, 405):
        return True
    # A missing route (FastAPI's {"detail": "Not Found"}), not "model not found".
    return resp.status_code == 404 and "error" not in resp.text[:200]


def _json(resp: httpx.Response, endpoint: Endpoint, what: str) -> Any:
    if resp.status_code != 200:
        raise TokenizationFailed(f"engine {endpoint.id}: {what} answered {resp.status_code}: {resp.text[:200]}")
    try:
        return resp.json()
    except ValueError:
        raise TokenizationFailed(f"engine {endpoint.id}: {what} answered invalid JSON") from None


def _auth(endpoint: Endpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
