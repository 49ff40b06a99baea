"""The OpenAI-compatible front: /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/responses (with GET /v1/responses/{id} and its cancel), /v1/models, and the engines' other
model-scoped APIs passed through (gateway.proxy.paths.PASSTHROUGH_PATHS)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from gateway.api.validation import check_request, parse_json_object
from gateway.endpoints.registry import EndpointRegistry
from gateway.errors import BadRequest, ClientClosedRequest, GatewayError, PayloadTooLarge
from gateway.generation import current
from gateway.metrics import GatewayMetrics
from gateway.proxy.paths import PASSTHROUGH_PATHS, RESPONSE_CANCEL_ROUTE, RESPONSE_ROUTE, RESPONSES_PATH
from gateway.proxy.stream import PassthroughResponse
from gateway.types import RoutingRequest

logger = logging.getLogger(__name__)
T = TypeVar("T")

PROXIED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", RESPONSES_PATH)
# Routes whose body may leave out `model`, as vLLM allows: the fleet's only model is meant.
MODEL_OPTIONAL_ROUTES = frozenset({RESPONSES_PATH, *PASSTHROUGH_PATHS})


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing early when it is larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        # Gone mid-body, or cut off by the body read timeout (gateway.limits.protocol): an
        # answer nobody reads, not an unhandled error with a traceback in the log.
        raise ClientClosedRequest("The client closed the connection before sending the whole body.") from None
    return b"".join(chunks)


def parse_request(body: bytes, api_path: str, *, require_model: bool = True,
                  allow_chat_templates: bool = False) -> dict[str, Any]:  # fmt: skip
    """The body as a JSON object whose fields the gateway reads are of the right types."""
    data = parse_json_object(body)
    model = data.get("model")
    if (require_model or model is not None) and (not isinstance(model, str) or not model):
        raise BadRequest("Missing required parameter: 'model'.", param="model")
    check_request(api_path, data, allow_chat_templates=allow_chat_templates)
    return data


def implied_model(registry: EndpointRegistry) -> str:
    """The model a body without one means: the only model the engines serve, or 400."""
    models = registry.known_models()
    if len(models) == 1:
        return next(iter(models))
    raise BadRequest(
        f"Missing required parameter: 'model' (the engines serve {len(models)} models).", param="model"
    )


# Unique per process (a random prefix) and cheap per request (a counter): uuid4 cost ~3 % of
# the gateway's CPU per request in a profile.
_REQUEST_ID_PREFIX = f"gw-{os.urandom(6).hex()}-"
_request_numbers = itertools.count(1)


def request_id_for(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    # Accept a client's id only when it is a sane token; it is echoed and logged.
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):x}"


def routing_request_from(
    request: Request, data: dict[str, Any], api_path: str, model: str | None = None
) -> RoutingRequest:
    return RoutingRequest(
        model=data["model"] if model is None else model,
        api_path=api_path,
        body=data,
        headers={k.lower(): v for k, v in request.headers.items()},
        request_id=request_id_for(request),
        stream=bool(data.get("stream", False)),
    )


async def until_client_leaves(request: Request, dispatching: Coroutine[Any, Any, T]) -> T | Response:
    """Run `dispatching` (routing, tokenizing, waiting for the engine's response headers, for a
    non-streamed request the whole answer) unless the client leaves first: then it is
    cancelled, which closes the upstream connection, and vLLM aborts the request instead of
    computing an answer nobody reads. Once the response exists, `PassthroughResponse` watches.

    The work runs in this task and one watcher task cancels it: a task for the work too and
    `asyncio.wait` on both cost ~5 % of the event loop's time per request (py-spy, 200 req/s)."""
    handler = asyncio.current_task()
    assert handler is not None
    finished = left = False

    def on_gone(watcher: asyncio.Task[None]) -> None:
        nonlocal left
        # Scheduled when the watcher ends: the work may have finished in between.
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            left = True
            handler.cancel()

    gone = asyncio.get_running_loop().create_task(_client_gone(request))
    gone.add_done_callback(on_gone)
    try:
        result = await dispatching
    except (asyncio.CancelledError, GatewayError):
        # A GatewayError too: the cancel may land where the work turns it into one.
        if not left or handler.uncancel() > 0:
            raise  # not the client leaving (another error; this handler cancelled at shutdown)
        result = None
    finally:
        finished = True
        gone.cancel()
    if not left:
        return result  # type: ignore[return-value]  # None only when the client left
    if isinstance(result, PassthroughResponse):
        # The work ended with a response in spite of the cancel (it caught it): an engine's
        # response nobody will send. Closed here, or the engine would go on for nobody and the
        # ledger count it forever (it ends as a client disconnect, counted there).
        handler.uncancel()
        await result.discard()
    else:
        metrics: GatewayMetrics = request.app.state.metrics
        metrics.client_disconnects.labels(request.url.path).inc()
    logger.info("client left before the response began (%s %s)", request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


async def _client_gone(request: Request) -> None:
    # The body is read already: what is left to receive is the disconnect (uvicorn repeats it
    # to every later receive, so the response's own watcher still gets it).
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # a server that answered at once again must not spin the loop


async def proxied(request: Request) -> Response:
    """POST on every route in PROXIED_ROUTES and PASSTHROUGH_PATHS: read, check, dispatch."""
    started_at = time.perf_counter()
    generation = current(request)
    generation.api_keys.check(request)
    proxy = generation.config.proxy
    body = await read_body(request, proxy.max_body_bytes)
    api_path: str = request.scope["path"]
    data = parse_request(body, api_path, require_model=api_path not in MODEL_OPTIONAL_ROUTES,
                         allow_chat_templates=proxy.allow_client_chat_templates)  # fmt: skip
    model = data["model"] if data.get("model") is not None else implied_model(generation.registry)
    routing_request = routing_request_from(request, data, api_path, model)
    return await until_client_leaves(request, generation.dispatcher.dispatch(routing_request, body, started_at))


def build_openai_router() -> APIRouter:
    router = APIRouter()
    for path in (*PROXIED_ROUTES, *PASSTHROUGH_PATHS):
        # Served ahead of the router (gateway.api.direct_routes); listed here for what the
        # router answers itself: another method's 405, the OpenAPI schema.
        router.routes.append(Route(path, proxied, methods=["POST"]))

    async def stored_response(request: Request, response_id: str) -> Any:
        """A stored Responses API response: to the engine that has it (Dispatcher.forward_stored)."""
        started_at = time.perf_counter()
        generation = current(request)
        generation.api_keys.check(request)
        route: str = request.scope["route"].path
        path = route.replace("{response_id}", quote(response_id, safe=""))
        if request.url.query:
            path = f"{path}?{request.url.query}"
        routing_request = RoutingRequest(
            model="",
            api_path=route,
            body={},
            headers={k.lower(): v for k, v in request.headers.items()},
            request_id=request_id_for(request),
            stream=request.query_params.get("stream", "").lower() == "true",
        )
        return await until_client_leaves(
            request, generation.dispatcher.forward_stored(routing_request, request.method, path, response_id, started_at)
        )

    router.add_api_route(RESPONSE_ROUTE, stored_response, methods=["GET"])
    router.add_api_route(RESPONSE_CANCEL_ROUTE, stored_response, methods=["POST"])

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        generation = current(request)
        generation.api_keys.check(request)
        return JSONResponse({"object": "list", "data": generation.registry.model_cards()})

    return router
