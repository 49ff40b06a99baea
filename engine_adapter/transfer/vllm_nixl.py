"""vLLM's NixlConnector with a NIXL progress thread that sleeps between polls.

Imported inside the engine processes, never by the gateway: local engines start with
`"kv_connector": "NixlConnector", "kv_connector_module_path": "engine_adapter.transfer.vllm_nixl"`
(engine_adapter.launch.launcher), and vLLM then loads `NixlConnector` from here.

Why: NIXL's Python agent creates its progress thread with no delay between polls, and vLLM
offers no setting for it, so each engine keeps one core busy even when idle (measured here:
~100 % of a core per engine; two engines on two cores leave nothing for inference, and a 1k
prefill took 1.1 s instead of 0.09 s). The thread cannot simply be turned off: an idle holder
then makes no progress on the transfers others pull from it, and they hang. A short sleep
between polls keeps idle engines quiet and costs a transfer at most that delay per round trip.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector as _VllmNixlConnector

# Microseconds between two polls of NIXL's progress thread (NIXL's pthrDelay).
PROGRESS_DELAY_US = int(os.environ.get("GATEWAY_NIXL_PROGRESS_DELAY_US", "1000"))


def _patch_nixl_agent_config() -> None:
    """Make every NIXL agent created in this process use PROGRESS_DELAY_US.

    `nixl_agent.__init__` builds its C++ config object and sets `pthrDelay = 0` on it before
    creating the agent; a subclass of the binding's config class that keeps the larger delay is
    swapped in where `nixl_agent` looks it up."""
    bindings = importlib.import_module(f"{_nixl_backend_module()}._bindings")
    base = bindings.nixlAgentConfig
    if getattr(base, "_gateway_delay_patched", False):
        return

    class DelayedProgressConfig(base):  # type: ignore[misc, valid-type]
        _gateway_delay_patched = True

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "pthrDelay":
                value = max(int(value), PROGRESS_DELAY_US)
            super().__setattr__(name, value)

    setattr(bindings, "nixlAgentConfig", DelayedProgressConfig)  # noqa: B010 - a module attribute


def _nixl_backend_module() -> str:
    for name in ("nixl_cu13", "nixl_cu12", "nixl_rocm"):
        try:
            importlib.import_module(name)
            return name
        except ImportError:
            continue
    raise ImportError("no NIXL backend package (nixl-cu12, nixl-cu13) is installed")


_patch_nixl_agent_config()


class NixlConnector(_VllmNixlConnector):
    """vLLM's own connector, unchanged; importing this module is what quiets the agent."""
