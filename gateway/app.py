"""`build_app(config)`: wire every component explicitly and own their lifetimes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.admin import build_admin_router
from gateway.api.openai import build_openai_router
from gateway.config import GatewayConfig
from gateway.endpoints.health import HealthChecker
from gateway.endpoints.outlier import OutlierDetector
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.errors import GatewayError, error_body, error_response
from gateway.metrics import GatewayMetrics
from gateway.proxy.dispatcher import Dispatcher
from gateway.proxy.upstream import build_client
from gateway.routing.base import ScorerContext
from gateway.routing.registry import build_scorers, policy_label
from gateway.routing.router import Router

logger = logging.getLogger(__name__)


def build_app(config: GatewayConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """Build the gateway for `config.engines` (local engines must already be resolved).

    `transport` replaces the network for every engine call (tests pass a MockTransport).
    """
    registry = EndpointRegistry.from_config(config.engines)
    metrics = GatewayMetrics()
    context = ScorerContext(session_header=config.routing.session_header)
    # Built here, not in the lifespan, so a bad policy fails before the server starts.
    router = Router(registry, build_scorers(config.routing, context), policy_label(config.routing))

    def on_health_change(endpoint: Endpoint) -> None:
        metrics.engine_healthy.labels(endpoint.id).set(1 if endpoint.healthy else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream = build_client(config.proxy, transport)
        control = httpx.AsyncClient(transport=transport)
        checker = HealthChecker(registry, control, config.health, on_health_change)
        app.state.dispatcher = Dispatcher(router, upstream, OutlierDetector(registry), metrics, config.proxy)
        app.state.health_checker = checker
        # Know each engine's models and health before the first request arrives.
        await checker.check_all()
        for endpoint in registry.endpoints:
            on_health_change(endpoint)
        checker.start()
        try:
            yield
        finally:
            await checker.stop()
            await upstream.aclose()
            await control.aclose()

    app = FastAPI(title="prefix-gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.router = router
    app.include_router(build_openai_router())
    app.include_router(build_admin_router())
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("Internal gateway error.", "internal_error"), status_code=500)
