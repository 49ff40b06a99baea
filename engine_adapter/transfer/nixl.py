"""Move a cached prefix from one vLLM engine to another with vLLM's NixlConnector pull flow.

Both engines run with `--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'`
(design.md §5). The flow is vLLM's disaggregated-prefill one, driven from outside:

1. prepare, on the holder: the prefix P (token ids, block-aligned, cached there) with
   `max_tokens: 1` and `kv_transfer_params: {"do_remote_decode": true}`. The holder answers
   with `kv_transfer_params` naming its NIXL agent and the blocks it keeps for the reader.
2. pull, on the target: the same P with those params. The target reads the blocks it lacks
   over NIXL, then holds P in its own prefix cache (and publishes BlockStored for it).
3. The caller then sends the real request to the target, where P hits the local cache.

The target's prompt must be exactly P: the holder's blocks are P's blocks. Prompts go as
token ids, so no tokenizer on either side can make them differ.

This module only speaks HTTP to the engines; deciding whether a transfer is worth it is the
gateway's (gateway.routing.transfer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

# What vLLM's disaggregated-prefill proxy sends to the prefill side (a KV transfer's holder,
# a disaggregated request's prefill engine); the engine fills in the rest in its answer.
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def _one_token_request(model: str, prompt: Sequence[int], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": 1,
        "temperature": 0.0,
        "stream": False,
        "kv_transfer_params": kv_transfer_params,
    }


@dataclass(frozen=True, slots=True)
class EngineAddress:
    url: str
    api_key: str | None = None

    def headers(self, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True, slots=True)
class TransferTimings:
    prepare_s: float  # the holder's 1-token request over its cached prefix
    pull_s: float  # the target's request that reads the blocks

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.pull_s


class KVTransferError(Exception):
    """The transfer did not happen; `stage` says where it stopped (for metrics and logs)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class NixlPullTransfer:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def transfer(
        self,
        holder: EngineAddress,
        target: EngineAddress,
        model: str,
        prefix_token_ids: Sequence[int],
        *,
        timeout_s: float,
        request_id: str,
    ) -> TransferTimings:
        """Both steps within `timeout_s`. Raises KVTransferError on any failure; cancelling
        an unfinished step closes its connection, so the engine aborts that request."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(timeout_s):
                params = await self.prepare(holder, model, prefix_token_ids, request_id=f"{request_id}-kvprep")
                prepared = time.perf_counter()
                await self.pull(target, model, prefix_token_ids, params, request_id=f"{request_id}-kvpull")
        except TimeoutError as exc:
            raise KVTransferError("timeout", f"transfer did not finish within {timeout_s:.1f}s") from exc
        done = time.perf_counter()
        return TransferTimings(prepare_s=prepared - started, pull_s=done - prepared)

    async def prepare(
        self, holder: EngineAddress, model: str, prefix_token_ids: Sequence[int], *, request_id: str
    ) -> dict[str, Any]:
        """Step 1: the holder pins P's blocks for a remote reader and says where they are."""
        body = _one_token_request(model, prefix_token_ids, dict(PREFILL_KV_PARAMS))
        data = await self._post(holder, body, "prepare", request_id)
        params = data.get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("remote_block_ids"):
            raise KVTransferError("prepare", "the holder returned no kv_transfer_params (is NixlConnector on?)")
        return params

    async def pull(
        self,
        target: EngineAddress,
        model: str,
        prefix_token_ids: Sequence[int],
        params: dict[str, Any],
        *,
        request_id: str,
    ) -> None:
        """Step 2: the target reads P's blocks from the holder into its own cache."""
        await self._post(target, _one_token_request(model, prefix_token_ids, params), "pull", request_id)

    async def _post(self, engine: EngineAddress, body: dict[str, Any], stage: str, request_id: str) -> dict[str, Any]:
        try:
            # No per-request timeout of the client's: `transfer`'s deadline bounds both steps
            # (a client's default 5 s would cut a warm-up's longer budget, gateway.elastic).
            resp = await self._client.post(f"{engine.url}/v1/completions", json=body, headers=engine.headers(request_id),
                                           timeout=None)  # fmt: skip
        except httpx.HTTPError as exc:
            raise KVTransferError(stage, f"{engine.url} failed: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise KVTransferError(stage, f"{engine.url} answered {resp.status_code}: {resp.text[:200]}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise KVTransferError(stage, f"{engine.url} answered with invalid JSON") from exc
        if not isinstance(data, dict):
            raise KVTransferError(stage, f"{engine.url} answered with unexpected JSON")
        return data
