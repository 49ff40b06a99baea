"""`build_app(config)`: wire every component explicitly and own their lifetimes."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine_adapter.transfer.nixl import NixlPullTransfer
from gateway.api.admin import build_admin_router
from gateway.api.auth import APIKeys
from gateway.api.debug import build_debug_router
from gateway.api.openai import build_openai_router
from gateway.config import ConfigError, GatewayConfig
from gateway.endpoints.health import HealthChecker
from gateway.endpoints.outlier import OutlierDetector
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.endpoints.shared import SharedFleetState
from gateway.errors import GatewayError, error_body, error_response
from gateway.kvindex.feeds import EventFeeds
from gateway.kvindex.ingest import IndexIngestor
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.service import PrefixService
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.metrics import GatewayMetrics
from gateway.proxy.dispatcher import Dispatcher
from gateway.proxy.transfer import KVTransferRunner
from gateway.proxy.upstream import build_client
from gateway.routing.base import ScorerContext
from gateway.routing.registry import build_scorers, policy_label
from gateway.routing.cost_model import CostModel
from gateway.routing.router import Router
from gateway.routing.ttft import TTFTEstimator
from gateway.tokenization.engine import EngineTokenizer
from gateway.tokenization.models import ModelTokenizers

logger = logging.getLogger(__name__)

# How long start-up waits for the tokenizer checks; slower ones finish in the background.
TOKENIZER_CHECK_TIMEOUT_S = 20.0


def build_app(
    config: GatewayConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    shared: SharedFleetState | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the gateway for `config.engines` (local engines must already be resolved).

    `transport` replaces the network for every engine call (tests pass a MockTransport);
    `shared` is what this worker shares with the others (gateway.workers); `freeze_gc`: the
    server processes (gateway.cli, gateway.workers) keep what start-up built out of the
    garbage collector's full passes (`freeze_long_lived`).
    """
    registry = EndpointRegistry.from_config(config.engines)
    if shared is not None:
        for row, endpoint in enumerate(registry.endpoints):
            endpoint.shared, endpoint.shared_index = shared, row
    metrics = GatewayMetrics()
    kv = config.kv_index
    layout = KVLayout(kv.block_size)
    working_sets = WorkingSetTracker(window_s=kv.working_set_window_s)
    cost_model = CostModel()
    estimator = TTFTEstimator(cost_model, layout=layout, registry=registry, transfer_config=config.kv_transfer)
    context = ScorerContext(
        session_header=config.routing.session_header,
        layout=layout,
        working_sets=working_sets,
        cost_model=cost_model,
        ttft_estimator=estimator,
    )
    # Built here, not in the lifespan, so a bad policy fails before the server starts.
    scorers = build_scorers(config.routing, context)
    router = Router(registry, scorers, policy_label(config.routing))
    # Tokenize, index and follow the engines' KV events only for a policy that reads prompts.
    uses_prefix = kv.enabled and any(w.scorer.needs_prompt_tokens and w.weight > 0 for w in scorers)
    # Transfers are planned by the kv_aware scorer's estimates: without it, none.
    plans_transfers = (
        uses_prefix
        and config.kv_transfer.enabled
        and any(w.scorer.name == "kv_aware" and w.weight > 0 for w in scorers)
        and sum(e.kv_transfer for e in config.engines) >= 2
    )
    index = InMemoryIndex(capacity_chunks=kv.capacity_chunks)
    ingestor = IndexIngestor(index, layout, registry.model_of, on_reset=lambda e, r: working_sets.forget(e))
    tokenizers: ModelTokenizers | None = None  # built with the control client, in the lifespan

    def on_join(endpoint: Endpoint) -> None:
        """An engine (re)joined: what it says about itself may have changed."""
        if endpoint.stats is not None and endpoint.stats.block_size is not None:
            layout.observe(endpoint.id, endpoint.stats.block_size)
        if tokenizers is not None:
            tokenizers.engine_joined(endpoint)

    def on_health_change(endpoint: Endpoint) -> None:
        metrics.engine_healthy.labels(endpoint.id).set(1 if endpoint.healthy else 0)
        # Out of rotation, an engine is no candidate, so what the index says of it routes
        # nothing; a blip must not make the gateway forget a cache the engine still has (vLLM
        # announces no blocks it already holds). A restart (new process start time, event
        # sequence back to 0) or a gap in its events that cannot be replayed does reset it.
        if endpoint.healthy:
            on_join(endpoint)

    def on_restart(endpoint: Endpoint) -> None:
        ingestor.reset(endpoint.id, "engine restarted")
        on_join(endpoint)

    def routing_problems() -> list[str]:
        """Why prefix routing is not (fully) working, for /health; empty when it is."""
        if not uses_prefix:
            return []
        found = layout.problems()
        if tokenizers is not None:
            found += [f"model {model}: {problem}" for model, problem in tokenizers.problems().items()]
        return found

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal tokenizers
        upstream = build_client(config.proxy, transport)
        control = httpx.AsyncClient(transport=transport)
        checker = HealthChecker(registry, control, config.health, on_health_change, on_restart)
        prefix = None
        feeds = EventFeeds(registry, ingestor, replay_timeout_s=kv.replay_timeout_s)
        if uses_prefix:
            tokenizers = build_tokenizers(config, control, registry, metrics,
                                          on_loaded=freeze_long_lived if freeze_gc else None)  # fmt: skip
            prefix = PrefixService(
                index, tokenizers, registry, working_sets, layout,
                speculative_ttl_s=kv.speculative_ttl_s, approximate_ttl_s=kv.approximate_ttl_s,
                on_tokenize_failure=lambda model: metrics.tokenization_failures.labels(model).inc(),
            )  # fmt: skip
        app.state.prefix = prefix
        app.state.tokenizers = tokenizers
        app.state.feeds = feeds
        transfers = None
        if plans_transfers and prefix is not None:
            transfers = KVTransferRunner(
                NixlPullTransfer(control), estimator, registry, prefix, metrics, config.kv_transfer
            )
        app.state.transfers = transfers
        app.state.dispatcher = Dispatcher(
            router, upstream, OutlierDetector(registry), metrics, config.proxy, prefix, cost_model, transfers
        )
        app.state.health_checker = checker
        # Know each engine's models, health and block size before the first request arrives.
        await checker.check_all(initial=True)
        for endpoint in registry.endpoints:
            metrics.engine_healthy.labels(endpoint.id).set(1 if endpoint.healthy else 0)
            if endpoint.healthy:
                on_join(endpoint)
        if uses_prefix and layout.configured is not None and layout.mismatches:
            if tokenizers is not None:
                await tokenizers.close()
            await control.aclose()
            await upstream.aclose()
            raise ConfigError(
                f"kv_index.block_size is {layout.configured}, but "
                + ", ".join(f"engine {e} uses {size}" for e, size in sorted(layout.mismatches.items()))
                + ": set it to the engines' --block-size, or leave it unset to read it from them"
            )
        checker.start()
        if uses_prefix:
            assert tokenizers is not None
            # Token ids checked against the engines before the first request.
            await tokenizers.check_all(timeout_s=TOKENIZER_CHECK_TIMEOUT_S)
            if kv.discover_event_sources:
                await feeds.discover(control)
            feeds.start()
        if freeze_gc:
            freeze_long_lived()
        try:
            yield
        finally:
            if tokenizers is not None:
                await tokenizers.close()
            await feeds.stop()
            await checker.stop()
            await upstream.aclose()
            await control.aclose()
            metrics.close()

    app = FastAPI(title="prefix-gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.api_keys = APIKeys(config.server.api_keys)
    app.state.registry = registry
    app.state.index = index
    app.state.ingestor = ingestor
    app.state.metrics = metrics
    app.state.router = router
    app.state.ttft_estimator = estimator
    app.state.layout = layout
    app.state.routing_problems = routing_problems
    app.include_router(build_openai_router())
    # The operators' API is not part of the API clients are shown (/openapi.json).
    app.include_router(build_admin_router(), include_in_schema=False)
    app.include_router(build_debug_router(), include_in_schema=False)
    install_error_handlers(app)
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


def build_tokenizers(
    config: GatewayConfig,
    client: httpx.AsyncClient,
    registry: EndpointRegistry,
    metrics: GatewayMetrics,
    on_loaded: Callable[[], None] | None = None,
) -> ModelTokenizers:
    # Ask the least loaded engine serving the model: a busy engine's API server answers slowly.
    engine = EngineTokenizer(client, lambda model: min(registry.candidates(model), key=lambda e: e.load, default=None))
    return ModelTokenizers(
        {m.name: m.tokenizer for m in config.models}, engine, registry,
        offload_min_chars=config.kv_index.tokenize_offload_min_chars,
        on_status=lambda model, status: metrics.tokenizer_ready.labels(model).set(1 if status.ok else 0),
        on_loaded=on_loaded,
    )  # fmt: skip


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
        return JSONResponse(error_body("Internal gateway error.", "internal_error"), status_code=500)
