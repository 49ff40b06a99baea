"""The engines' KV block size, which every chunk key must line up with.

Set in YAML (`kv_index.block_size`) or learned from the engines themselves: the
`vllm:cache_config_info` metric each health check scrapes, or the `block_size` of a
`BlockStored` event, whichever comes first. An engine whose block size differs from the one
in force is a mismatch: its blocks can never match the gateway's keys, so it is reported
(health, log) instead of silently missing.
"""

from __future__ import annotations

import logging

from gateway.types import EngineId

logger = logging.getLogger(__name__)


class KVLayout:
    def __init__(self, block_size: int | None = None) -> None:
        self.configured = block_size
        # 0 until known: nothing is chunked or indexed before the first engine reports it.
        self.block_size = block_size or 0
        # engine -> the block size it reported, for engines that disagree with `block_size`.
        self.mismatches: dict[EngineId, int] = {}

    @property
    def known(self) -> bool:
        return self.block_size > 0

    def observe(self, engine: EngineId, block_size: int) -> bool:
        """Record what `engine` uses; False when it cannot share this index's keys."""
        if not self.known:
            self.block_size = block_size
            logger.info("KV block size %d, as engine %s reports it", block_size, engine)
        if block_size == self.block_size:
            self.mismatches.pop(engine, None)
            return True
        if self.mismatches.get(engine) != block_size:
            source = "kv_index.block_size" if self.configured else f"the first engine's ({self.block_size})"
            logger.error(
                "engine %s uses KV block size %d, but %s is %d: its cached prefixes cannot be matched. "
                "Start every engine with the same --block-size, and set kv_index.block_size to it or leave it unset.",
                engine, block_size, source, self.block_size,
            )  # fmt: skip
        self.mismatches[engine] = block_size
        return False

    def problems(self) -> list[str]:
        found = [
            f"engine {engine} uses KV block size {size}, the index {self.block_size}"
            for engine, size in sorted(self.mismatches.items())
        ]
        if not self.known:
            found.append("KV block size not known yet: no engine has reported it (set kv_index.block_size)")
        return found
