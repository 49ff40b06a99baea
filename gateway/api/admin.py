"""Operational endpoints: /health, /metrics, and the token-protected /admin API."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from gateway.config import ConfigError, EngineConfig, format_validation_error
from gateway.elastic.warmup import Outcome
from gateway.endpoints.registry import Endpoint
from gateway.errors import BadRequest, ModelNotFound, Unauthorized
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
        "warming": endpoint.warming,
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

    @router.post("/admin/engines")
    async def add_engine(request: Request) -> JSONResponse:
        """Add an engine (the body: one `engines` entry of the configuration). It is health
        checked, warmed with the fleet's hot prefixes (gateway.elastic), then in rotation when
        this answers. It stays until the configuration file is next applied."""
        require_admin(request)
        runtime = request.app.state.runtime
        if runtime.generation.config.server.workers > 1:
            raise BadRequest("With several workers, add engines through the configuration file.")
        try:
            engine = EngineConfig.model_validate(await request.json())
        except ValidationError as exc:
            raise BadRequest(format_validation_error(exc, "the engine")) from None
        except ValueError:
            raise BadRequest("The body must be one engine, as JSON.") from None
        try:
            endpoint = await runtime.add_engine(engine)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        outcome = runtime.warmed.get(endpoint.id)
        return JSONResponse({**endpoint_state(endpoint, time.monotonic()), "warm_up": _outcome(outcome)})

    @router.post("/admin/engines/{engine_id}/drain")
    async def drain(engine_id: str, request: Request) -> JSONResponse:
        """Take the engine out of rotation; first, its hot prefixes that no other engine holds
        move to peers (gateway.elastic), within `elastic`'s budget."""
        response = _set_draining(request, engine_id, True)
        endpoint = current(request).registry.get(engine_id)
        assert endpoint is not None
        outcome = await request.app.state.runtime.elastic.hand_off(endpoint, current(request))
        return JSONResponse({**endpoint_state(endpoint, time.monotonic()), "hand_off": _outcome(outcome)},
                            status_code=response.status_code)  # fmt: skip

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


def _outcome(outcome: Outcome | None) -> dict[str, Any] | None:
    if outcome is None:
        return None
    return {"prefixes_pulled": outcome.num_pulled, "prefixes_failed": outcome.num_failed,
            "prefixes_over_budget": outcome.num_over_budget, "prefixes_in_store": outcome.num_in_store,
            "prefixes_held": outcome.num_held, "prefixes_unheld": outcome.num_unheld,
            "prefixes_too_small": outcome.num_too_small,
            "tokens_moved": outcome.moved_tokens, "duration_s": round(outcome.duration_s, 3)}  # fmt: skip
