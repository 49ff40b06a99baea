"""The half-open probe of outlier detection: is this engine serving again?

vLLM's /health answers from the API server process even while the engine core is stopped or
stuck, so the probe is real work for the core: a 1-token completion (an embedding for a
pooling model, which has no completions API), sent through the client the traffic uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from gateway.endpoints.registry import Endpoint
from gateway.errors import UpstreamError
from gateway.proxy.upstream import UpstreamClient, upstream_headers

logger = logging.getLogger(__name__)

# (path, body without the model): tried in order until one is an API the engine has.
_PROBES = (
    ("/v1/completions", {"prompt": "ping", "max_tokens": 1, "temperature": 0}),
    ("/v1/embeddings", {"input": "ping"}),
)


async def probe_inference(client: UpstreamClient, endpoint: Endpoint, timeout_s: float) -> bool:
    """True when the engine answered one small inference request with 200 within `timeout_s`."""
    model = min(endpoint.models, default=None)
    if model is None:
        return False
    headers = upstream_headers({}, endpoint, f"probe-{uuid.uuid4().hex[:12]}")
    try:
        async with asyncio.timeout(timeout_s):
            for path, body in _PROBES:
                response = await client.open(endpoint, "POST", path, headers, json.dumps({**body, "model": model}).encode())
                try:
                    async for _ in response.aiter_raw():
                        pass
                finally:
                    await response.aclose()
                if response.status_code == 200:
                    return True
                # 404: no such API (a pooling model has no completions); 400: this model does
                # not support it. Any other answer is a failure.
                if response.status_code not in (400, 404):
                    break
    except (TimeoutError, UpstreamError) as exc:
        logger.info("probe of engine %s failed: %s", endpoint.id, exc or type(exc).__name__)
        return False
    logger.info("probe of engine %s failed: status %d", endpoint.id, response.status_code)
    return False
