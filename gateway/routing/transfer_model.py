"""How long moving a cached prefix between engines takes, calibrated online.

    transfer(m moved tokens) = fixed + per_token · m

`fixed` is the two HTTP round trips of the pull flow (the holder's 1-token request over its
cached prefix, the target's request that reads the blocks, NIXL's handshake and notification);
`per_token` the wire time. Both come from the transfers the gateway times itself (exponentially
weighted least squares, with a prior as pseudo-samples, like gateway.routing.cost_model), and
the wire time per token is never taken below what the target engines' own NIXL metrics
(`vllm:nixl_xfer_time_seconds`) report for the tokens the gateway moved into them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.endpoints.registry import Endpoint
from gateway.routing.regression import FixedPlusPerToken
from gateway.types import EngineId


@dataclass(frozen=True, slots=True)
class TransferPrior:
    fixed_s: float = 0.03
    per_token_s: float = 2e-6
    weight: float = 1.0  # pseudo-samples at each of two sizes: a guess, soon outweighed


class TransferCostModel(FixedPlusPerToken):
    def __init__(self, prior: TransferPrior | None = None, forgetting: float = 0.95) -> None:
        self.prior = p = prior or TransferPrior()
        super().__init__(p.fixed_s, p.per_token_s, p.weight, (512, 4096), forgetting)
        # Per target engine: NIXL seconds it reported before our first transfer into it, and
        # the tokens we moved into it since.
        self._wire_baseline_s: dict[EngineId, float] = {}
        self._tokens_moved: dict[EngineId, int] = {}
        self._wire_per_token_s = 0.0

    @property
    def per_token_s(self) -> float:
        """Never below the wire time the engines' NIXL metrics show."""
        return max(super().per_token_s, self._wire_per_token_s)

    def seconds(self, moved_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * moved_tokens

    def about_to_move(self, target: Endpoint) -> None:
        """Call before a transfer into `target`: remembers the engine's NIXL counter baseline."""
        if target.id not in self._wire_baseline_s:
            self._wire_baseline_s[target.id] = target.stats.nixl_xfer_seconds if target.stats else 0.0
            self._tokens_moved[target.id] = 0

    def observe(self, target: EngineId, moved_tokens: int, seconds: float) -> None:
        """One finished transfer as the gateway timed it (both steps)."""
        if moved_tokens <= 0 or seconds <= 0:
            return
        self.add(moved_tokens, seconds)
        if target in self._tokens_moved:
            self._tokens_moved[target] += moved_tokens

    def refresh_wire_time(self, endpoints: Iterable[Endpoint]) -> None:
        """Wire seconds per token from the targets' NIXL metrics (scraped with their health)."""
        seconds = 0.0
        tokens = 0
        for e in endpoints:
            if e.id not in self._wire_baseline_s or e.stats is None:
                continue
            delta = e.stats.nixl_xfer_seconds - self._wire_baseline_s[e.id]
            if delta < 0:  # the engine restarted: its counters began again
                self._wire_baseline_s[e.id] = e.stats.nixl_xfer_seconds
                self._tokens_moved[e.id] = 0
                continue
            seconds += delta
            tokens += self._tokens_moved.get(e.id, 0)
        if tokens > 0:
            self._wire_per_token_s = seconds / tokens

    def describe(self) -> dict[str, float]:
        return {
            "fixed_s": self.fixed_s,
            "per_token_s": self.per_token_s,
            "wire_per_token_s": self._wire_per_token_s,
            "num_samples": float(self.num_samples),
        }
