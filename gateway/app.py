"""`build_app(config)`: the HTTP application around the running gateway (gateway.runtime),
which owns every component and its lifetime; with a `config_file`, it follows that file
(gateway.reload)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.admin import build_admin_router
from gateway.api.debug import build_debug_router
from gateway.api.direct_routes import DirectRoutes
from gateway.api.openai import PROXIED_ROUTES, build_openai_router, proxied
from gateway.config import GatewayConfig
from gateway.config_file import ConfigFile
from gateway.endpoints.shared import SharedFleetState
from gateway.errors import GatewayError, error_body, error_response, internal_error_response
from gateway.limits.admission import Admission
from gateway.limits.loop_lag import EventLoopLag
from gateway.limits.protocol import COUNT_REJECTION
from gateway.proxy.paths import PASSTHROUGH_PATHS
from gateway.reload import ConfigReloader
from gateway.runtime import GatewayRuntime

logger = logging.getLogger(__name__)


def build_app(
    config: GatewayConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    shared: SharedFleetState | None = None,
    config_file: ConfigFile | None = None,
    config_digest: str = "",
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the gateway for `config.engines` (local engines must already be resolved).

    `transport` replaces the network for every engine call (tests pass a MockTransport);
    `shared` is what this worker shares with the others (gateway.workers); `config_file`, the
    file `config` was read from (its text's digest: `config_digest`), is followed for changes;
    `freeze_gc`: the server processes (gateway.cli, gateway.workers) keep what start-up built
    out of the garbage collector's full passes (`freeze_long_lived`).
    Raises ConfigError for a policy that cannot be built.
    """
    runtime = GatewayRuntime(config, transport=transport, shared=shared,
                             on_tokenizer_loaded=freeze_long_lived if freeze_gc else None)  # fmt: skip
    limits = config.limits
    loop_lag = EventLoopLag() if limits.max_event_loop_lag_s is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await runtime.start()
        if loop_lag is not None:
            loop_lag.start(asyncio.get_running_loop())
        if freeze_gc:
            freeze_long_lived()
        reloader = None
        if config_file is not None:
            reloader = ConfigReloader(
                config_file, runtime, runtime.metrics, digest=config_digest,
                poll_interval_s=lambda: runtime.generation.config.server.config_poll_interval_s,
            )  # fmt: skip
            reloader.start()
        app.state.reloader = reloader
        try:
            # Lifespan state is what uvicorn hands its protocol (gateway.limits.protocol).
            yield {COUNT_REJECTION: count_rejection}
        finally:
            if loop_lag is not None:
                loop_lag.stop()
            if reloader is not None:
                await reloader.stop()
            await runtime.stop()

    def count_rejection(reason: str) -> None:
        runtime.metrics.rejections.labels(reason).inc()

    app = FastAPI(title="prefix-gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Requests read `runtime.generation` once, when they arrive (gateway.generation.current).
    app.state.runtime = runtime
    app.state.metrics = runtime.metrics
    app.include_router(build_openai_router())
    # The operators' API is not part of the API clients are shown (/openapi.json).
    app.include_router(build_admin_router(), include_in_schema=False)
    app.include_router(build_debug_router(), include_in_schema=False)
    install_error_handlers(app)
    # Added before Admission, so inside it: the proxied routes are admitted like the rest.
    app.add_middleware(DirectRoutes, routes=dict.fromkeys((*PROXIED_ROUTES, *PASSTHROUGH_PATHS), proxied))
    app.add_middleware(
        Admission, max_requests=limits.max_concurrent_requests, api_keys=lambda: runtime.generation.api_keys,
        retry_after_s=limits.retry_after_s, on_reject=count_rejection,
        loop_lag=loop_lag, max_loop_lag_s=limits.max_event_loop_lag_s or float("inf"),
    )  # fmt: skip
    return app


def freeze_long_lived() -> None:
    """Move every object alive now out of the collector's way (gc.freeze), garbage collected
    first. What start-up builds lives as long as the process: the modules (with a local
    tokenizer, transformers and torch: ~400k objects), tokenizers, scorers. CPython's full
    collection walks every tracked object and stops the event loop meanwhile: 0.3-0.6 s each,
    every few seconds while thousands of streams opened (bench.load streams), every stream
    stalled with it. Frozen objects are still freed when their last reference goes; only a
    cycle among them is never collected. Called again when a tokenizer loads after start-up,
    it also freezes what the requests then in flight hold: their cycles, if any, stay (once
    per tokenizer loaded)."""
    gc.collect()
    gc.freeze()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"Invalid URL ({request.method} {request.url.path}): {message}"
        # A 405 carries `Allow` (RFC 9110 §15.5.6), which Starlette puts on the exception.
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error_response()
