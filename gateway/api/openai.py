"""The OpenAI-compatible front: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.proxy.dispatcher import Dispatcher
from gateway.types import RoutingRequest

PROXIED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing early when it is larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("Request body is empty; expected a JSON object.")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object.")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Missing required parameter: 'model'.", param="model")
    return data


def request_id_for(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    # Accept a client's id only when it is a sane token; it is echoed and logged.
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"gw-{uuid.uuid4().hex}"


def routing_request_from(request: Request, data: dict[str, Any], api_path: str) -> RoutingRequest:
    return RoutingRequest(
        model=data["model"],
        api_path=api_path,
        body=data,
        headers={k.lower(): v for k, v in request.headers.items()},
        request_id=request_id_for(request),
        stream=bool(data.get("stream", False)),
    )


def build_openai_router() -> APIRouter:
    router = APIRouter()

    async def proxied(request: Request) -> Any:
        started_at = time.perf_counter()
        dispatcher: Dispatcher = request.app.state.dispatcher
        body = await read_body(request, request.app.state.config.proxy.max_body_bytes)
        data = parse_json_object(body)
        routing_request = routing_request_from(request, data, request.url.path)
        return await dispatcher.dispatch(routing_request, body, started_at)

    for path in PROXIED_ROUTES:
        router.add_api_route(path, proxied, methods=["POST"])

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": request.app.state.registry.model_cards()})

    return router
