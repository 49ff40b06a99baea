"""Client API keys (`server.api_keys`, GATEWAY_API_KEYS): with any configured, every client
request carries one, as `Authorization: Bearer <key>` (the OpenAI SDK's way) or `x-api-key`
(the Anthropic SDK's). Compared in constant time against every key, so neither a match's
position nor a prefix shows in the timing. Keys are the gateway's: never sent to engines."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from gateway.errors import Unauthorized


class APIKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def check(self, request: Request) -> None:
        if not self._keys:
            return
        given = request.headers.get("authorization", "")
        given = given[7:].strip() if given[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        presented = given.encode()
        matched = False
        for key in self._keys:  # no early exit: the same work whichever key matches
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise Unauthorized("Incorrect API key provided." if given else "Missing API key: send it as "
                               "'Authorization: Bearer <key>'.")  # fmt: skip
