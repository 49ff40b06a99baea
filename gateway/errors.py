"""The gateway's error tree and its OpenAI-shaped JSON rendering.

    GatewayError                      any error the gateway itself reports
    ├── BadRequest (400)              invalid JSON, missing/invalid fields
    ├── Unauthorized (401)
    ├── ModelNotFound (404)
    ├── ResponseNotFound (404)        a Responses API id no engine holds
    ├── EndpointNotServed (404)       the model's engine has no such API
    ├── PayloadTooLarge (413)
    ├── TooManyRequests (429)         the client's API key has its cap of requests in flight
    ├── ClientClosedRequest (499)     the client left (or was cut off) while sending its body
    ├── Overloaded (503)              this worker has its cap of requests in flight, or routing
    ├── NoHealthyEndpoint (503)       the model exists but no engine can take it now
    └── UpstreamError (502)           an engine failed before answering
        ├── UpstreamConnectError (502)
        └── UpstreamTimeout (504)

Foreign exceptions (httpx) are mapped to this tree in `gateway.proxy.upstream` only.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None) -> None:
        """`retry_after_s`: sent as `Retry-After` (a refusal the client may retry later)."""
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.code, self.param)


class BadRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class EndpointNotServed(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "unsupported_endpoint"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class TooManyRequests(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ClientClosedRequest(GatewayError):
    # nginx's code for a request its client abandoned: nobody reads this answer.
    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


class Overloaded(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "overloaded"


class NoHealthyEndpoint(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "no_healthy_engine"


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    code = "bad_gateway"


class UpstreamConnectError(UpstreamError):
    code = "engine_unreachable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    error_type = "timeout"
    code = "engine_timeout"


class FirstByteTimeout(UpstreamTimeout):
    """No first byte within `proxy.first_byte_timeout_s`, or the engine was found hung while
    the request waited: retried on another engine. (A non-streamed request that outlives the
    socket's read timeout is not: its client waited that long already.)"""


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.retry_after_s is not None:
        headers = {**(headers or {}), "retry-after": str(exc.retry_after_s)}
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


def internal_error_response() -> JSONResponse:
    """A bug's answer: no detail for the client (the log has the traceback)."""
    return JSONResponse(error_body("Internal gateway error.", "internal_error"), status_code=500)
