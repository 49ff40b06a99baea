"""How long an engine takes to load a prefix from its shared KV store, calibrated online.

    load(t loaded tokens) = fixed + per_token · t

is what loading `t` tokens from the store (gateway.kvindex.stores) adds to the engine's time
to first token over a hit on the same tokens in its own device cache. The prior is what
`bench/kv_store.py` measured (two CPU engines, one LMCache server, fast mode): 8k tokens
~60 ms as a local hit, ~100–127 ms from the store, ~5 µs a token; 2k tokens within noise of a
local hit. Calibration: each answered request that loaded tokens from the store (the engine
reported more cached tokens than it holds itself) gives (tokens loaded, its TTFT minus the
cost model's local-hit estimate for the tokens it reported), fitted like the other models
(exponentially weighted least squares with a prior that never fades, gateway.routing.regression).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routing.regression import FixedPlusPerToken


@dataclass(frozen=True, slots=True)
class StorePrior:
    fixed_s: float = 0.005
    per_token_s: float = 5e-6
    weight: float = 1.0  # pseudo-samples at each of two sizes: a few loads outweigh it


class StoreLoadModel(FixedPlusPerToken):
    def __init__(self, prior: StorePrior | None = None, forgetting: float = 0.95) -> None:
        self.prior = p = prior or StorePrior()
        super().__init__(p.fixed_s, p.per_token_s, p.weight, (1024, 8192), forgetting)

    def seconds(self, loaded_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * loaded_tokens if loaded_tokens > 0 else 0.0

    def observe(self, loaded_tokens: int, extra_s: float, ttft_s: float, queued_s: float) -> None:
        """One answered request that loaded `loaded_tokens` from the store and took `extra_s`
        longer than a local hit on them was estimated to take (may be negative: noise). Like
        the cost model, only requests that waited behind little are informative."""
        if loaded_tokens <= 0 or ttft_s <= 0 or queued_s > 0.25 * ttft_s:
            return
        self.add(loaded_tokens, extra_s)

    def describe(self) -> dict[str, float]:
        return {"fixed_s": self.fixed_s, "per_token_s": self.per_token_s, "num_samples": float(self.num_samples)}
