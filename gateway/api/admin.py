"""Operational endpoints: /health, /metrics, and the token-protected /admin API."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.endpoints.registry import Endpoint
from gateway.errors import ModelNotFound, Unauthorized
from gateway.generation import current


def require_admin(request: Request) -> None:
    token = current(request).config.server.admin_token
    if token is None:
        raise Unauthorized("The admin API is disabled: set server.admin_token in the configuration.")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("Invalid admin token.")


def endpoint_state(endpoint: Endpoint, now: float) -> dict[str, Any]:
    stats = endpoint.stats
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "available": endpoint.available(now),
        "healthy": endpoint.healthy,
        "draining": endpoint.is_draining,
        "kv_transfer": endpoint.kv_transfer,
        "role": endpoint.role,
        "ejected": endpoint.ejected_until > now,
        "ejection_reason": endpoint.ejection_reason if endpoint.ejected_until > now else None,
        "models": sorted(endpoint.models),
        "in_flight": endpoint.in_flight,
        "num_requests_running": None if stats is None else stats.num_requests_running,
        "num_requests_waiting": None if stats is None else stats.num_requests_waiting,
        "kv_cache_usage": None if stats is None else stats.kv_cache_usage,
    }


def build_admin_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        """ok; degraded (serving, but prefix routing is not fully working: `problems` says
        why); unavailable (no engine to serve, 503)."""
        registry = current(request).registry
        now = time.monotonic()
        available = sum(1 for e in registry.endpoints if e.available(now))
        problems = request.app.state.runtime.routing_problems()
        status = "unavailable" if not available else ("degraded" if problems else "ok")
        body = {"status": status, "engines_available": available, "engines_total": len(registry.endpoints),
                "problems": problems}  # fmt: skip
        return JSONResponse(body, status_code=200 if available else 503)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/admin/engines")
    async def list_engines(request: Request) -> JSONResponse:
        require_admin(request)
        now = time.monotonic()
        return JSONResponse({"engines": [endpoint_state(e, now) for e in current(request).registry.endpoints]})

    @router.post("/admin/engines/{engine_id}/drain")
    async def drain(engine_id: str, request: Request) -> JSONResponse:
        return _set_draining(request, engine_id, True)

    @router.post("/admin/engines/{engine_id}/undrain")
    async def undrain(engine_id: str, request: Request) -> JSONResponse:
        return _set_draining(request, engine_id, False)

    return router


def _set_draining(request: Request, engine_id: str, draining: bool) -> JSONResponse:
    require_admin(request)
    endpoint = current(request).registry.get(engine_id)
    if endpoint is None:
        raise ModelNotFound(f"No engine named `{engine_id}`.", param="engine_id")
    endpoint.set_draining(draining)
    return JSONResponse(endpoint_state(endpoint, time.monotonic()))
