"""The proxied routes, served ahead of the web framework's routing.

Every inference request takes one of them, and on the way the framework matches the path
against every route and passes two exception-handling layers and FastAPI's exit stack, none
of which these handlers use: they read their bodies themselves, and their errors are answered
here in OpenAI's shape, as the application's exception handlers (gateway.app) would answer
them. Other methods on these paths, and every other path, go on to the application.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, error_response, internal_error_response

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler]) -> None:
        self.app = app
        self._routes = routes  # path -> the handler of its POST

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except GatewayError as exc:
            response = error_response(exc)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = internal_error_response()
        await response(scope, receive, send)
