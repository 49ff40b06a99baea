"""Client API keys (`server.api_keys`, GATEWAY_API_KEYS): with any configured, every client
request carries one, as `Authorization: Bearer <key>` (the OpenAI SDK's way) or `x-api-key`
(the Anthropic SDK's). Compared in constant time against every key, so neither a match's
position nor a prefix shows in the timing. Keys are the gateway's: never sent to engines.

`identify` says which key a request presents (its position in `server.api_keys`); the
per-key concurrency cap (gateway.limits.admission) and the handlers' `check` both ask, and
the answer is kept in the request's scope so the keys are compared once per request. The
answer is kept with the `APIKeys` that gave it: after a configuration reload (a key revoked,
the list reordered) the new keys never trust the old keys' answer."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.types import Scope

from gateway.config import APIKeyConfig
from gateway.errors import Unauthorized

# Scope entry holding `identify`'s answer: (the APIKeys asked, a key's position or -1 for none).
_IDENTITY = "gateway.api_key"


class APIKeys:
    def __init__(self, keys: list[APIKeyConfig], default_cap: int | None = None) -> None:
        """`default_cap`: requests in flight per key where a key sets none (None: no cap)."""
        self._keys = [k.key.encode() for k in keys]
        self._caps = [k.max_concurrent_requests or default_cap for k in keys]
        self.has_caps = any(cap is not None for cap in self._caps)

    def cap(self, position: int) -> int | None:
        return self._caps[position]

    def key(self, position: int) -> bytes:
        return self._keys[position]

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, scope: Scope) -> int | None:
        """Position in `server.api_keys` of the key the request presents; None when it presents
        none of them (or no keys are configured)."""
        cached: tuple[APIKeys, int] | None = scope.get(_IDENTITY)
        if cached is not None and cached[0] is self:
            known = cached[1]
        else:
            known = self._match(presented_key(scope))
            scope[_IDENTITY] = (self, known)
        return None if known < 0 else known

    def check(self, request: Request) -> None:
        if not self._keys or self.identify(request.scope) is not None:
            return
        if presented_key(request.scope):
            raise Unauthorized("Incorrect API key provided.")
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")

    def _match(self, presented: bytes) -> int:
        matched = -1
        for position, key in enumerate(self._keys):  # no early exit: the same work whichever key matches
            if hmac.compare_digest(presented, key):
                matched = position
        return matched


def presented_key(scope: Scope) -> bytes:
    """The bearer token of `Authorization`, else `x-api-key`, else b""; the first of each
    header, as Starlette's `Headers.get` reads them."""
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value
        elif name == b"x-api-key" and api_key is None:
            api_key = value
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return bytes(authorization[7:].strip())
    return b"" if api_key is None else bytes(api_key)
