"""Time-to-first-token estimates per engine, calibrated online.

    prefill(c cached, u uncached) = a·u + b·((c+u)² − c²)

The linear term is the per-token work, the quadratic one attention over the growing context
(on the tiny CPU model a 1k-token prefill costs ~90 ms and a 15k one ~3.1 s: not linear).
    ttft(engine) = overhead + queue(engine) + d·running(engine) + prefill(c_engine, u_engine)
where queue is the predicted prefill of requests already sent to the engine that have not
produced their first byte, and d the time each request already running on the engine adds
(the new prefill shares the engine's steps with their decoding).

Calibration: every answered request gives (cached tokens the engine reported, prompt tokens,
requests running when it was sent, observed TTFT, queue it was predicted to wait behind).
Requests that did not wait behind much are fitted by exponentially weighted least squares on
[1, u, (c+u)²−c², running]; the prior acts as pseudo-samples so the model is sensible before
any traffic and never drifts to negative rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.routing.regression import PriorLeastSquares


@dataclass(frozen=True, slots=True)
class CostPrior:
    overhead_s: float = 0.01
    per_token_s: float = 7e-5
    attention_s: float = 9e-9  # per token pair
    interference_s: float = 0.005  # added per request decoding on the engine
    weight: float = 5.0  # how many samples the prior counts for


class CostModel:
    def __init__(self, prior: CostPrior | None = None, forgetting: float = 0.98) -> None:
        self.prior = prior or CostPrior()
        p = self.prior
        # Pseudo-samples at representative sizes pin the prior's curve. The interference prior
        # is a guess (it depends on the model and the batch), so its points count for less.
        prior_samples = []
        for c, u, r, w in ((0, 256, 0, 1.0), (0, 2048, 0, 1.0), (2048, 256, 0, 1.0), (0, 8192, 0, 1.0),
                           (2048, 256, 4, 0.2), (0, 2048, 8, 0.2)):  # fmt: skip
            x = self._features(c, u, r)
            y = p.overhead_s + p.per_token_s * u + p.attention_s * x[2] + p.interference_s * r
            prior_samples.append((x, y, w * p.weight))
        self._fit = PriorLeastSquares(prior_samples, forgetting)

    @staticmethod
    def _features(cached: int, uncached: int, running: float = 0.0) -> np.ndarray:
        total = cached + uncached
        return np.array([1.0, float(uncached), float(total * total - cached * cached), float(running)])

    @property
    def _coef(self) -> np.ndarray:
        return self._fit.coef

    @property
    def num_samples(self) -> int:
        return self._fit.num_samples

    def prefill_s(self, cached_tokens: int, uncached_tokens: int) -> float:
        """Engine time to prefill `uncached_tokens` after `cached_tokens` (no overhead)."""
        x = self._features(cached_tokens, uncached_tokens)
        return float(self._coef[1] * x[1] + self._coef[2] * x[2])

    @property
    def overhead_s(self) -> float:
        return float(self._coef[0])

    @property
    def interference_s(self) -> float:
        return float(self._coef[3])

    def ttft_s(self, cached_tokens: int, uncached_tokens: int, queued_s: float, running: float) -> float:
        return (
            self.overhead_s
            + queued_s
            + self.interference_s * running
            + self.prefill_s(cached_tokens, uncached_tokens)
        )

    def observe(
        self, cached_tokens: int, prompt_tokens: int, ttft_s: float, queued_s: float, running: float = 0.0
    ) -> None:
        """One answered request. Only those that waited behind little are informative."""
        if queued_s > 0.25 * ttft_s or prompt_tokens <= 0 or ttft_s <= 0:
            return
        uncached = max(0, prompt_tokens - cached_tokens)
        x = self._features(cached_tokens, uncached, running)
        self._fit.add(x, ttft_s - queued_s)

    def describe(self) -> dict[str, float]:
        return {
            "overhead_s": self.overhead_s,
            "per_token_s": float(self._coef[1]),
            "attention_s": float(self._coef[2]),
            "interference_s": self.interference_s,
            "num_samples": float(self.num_samples),
        }
