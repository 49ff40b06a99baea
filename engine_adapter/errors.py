"""What a vLLM error answer says about the engine rather than the request.

vLLM answers 500 with this message once its engine core has died (`EngineDeadError`, vLLM
0.32), then shuts its API server down. Unlike other 500s, which a request's own input can
cause, it means the engine can serve nothing: another engine should take the request.
"""

from __future__ import annotations

import json

ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue"


def says_engine_dead(status_code: int, body: bytes) -> bool:
    if status_code != 500:
        return False
    try:
        error = json.loads(body).get("error")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and message.startswith(ENGINE_DEAD_MESSAGE)
