"""Time-to-first-token estimates per engine, calibrated online.

    prefill(c cached, u uncached) = a·u + b·((c+u)² − c²)

The linear term is the per-token work, the quadratic one attention over the growing context
(on the tiny CPU model a 1k-token prefill costs ~90 ms and a 15k one ~3.1 s: not linear).
    ttft(engine) = overhead + queue(engine) + prefill(c_engine, u_engine)
where queue is the predicted prefill of requests already sent to the engine that have not
produced their first byte, plus a per-running-request interference term.

Calibration: every answered request gives (cached tokens the engine reported, prompt tokens,
observed TTFT, queue it was predicted to wait behind). Requests that did not wait are fitted by
exponentially weighted least squares on [1, u, (c+u)²−c²]; the prior acts as pseudo-samples
so the model is sensible before any traffic and never drifts to negative rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        self._forgetting = forgetting
        p = self.prior
        # Pseudo-samples at representative sizes pin the prior's curve.
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        for c, u in ((0, 256), (0, 2048), (2048, 256), (0, 8192)):
            x = self._features(c, u)
            y = p.overhead_s + p.per_token_s * u + p.attention_s * x[2]
            self._xtx += p.weight * np.outer(x, x)
            self._xty += p.weight * x * y
        self._prior_xtx, self._prior_xty = self._xtx.copy(), self._xty.copy()
        self.num_samples = 0
        self._coef = self._solve()

    @staticmethod
    def _features(cached: int, uncached: int) -> np.ndarray:
        total = cached + uncached
        return np.array([1.0, float(uncached), float(total * total - cached * cached)])

    def _solve(self) -> np.ndarray:
        # The features span ~8 orders of magnitude (1, tokens, tokens²): scale the normal
        # equations to unit diagonal first, or the solve loses the overhead term entirely.
        scale = np.sqrt(np.maximum(np.diag(self._xtx), 1e-300))
        scaled = np.linalg.solve(self._xtx / np.outer(scale, scale), self._xty / scale)
        return np.asarray(np.maximum(scaled / scale, 0.0), dtype=float)

    def prefill_s(self, cached_tokens: int, uncached_tokens: int) -> float:
        """Engine time to prefill `uncached_tokens` after `cached_tokens` (no overhead)."""
        x = self._features(cached_tokens, uncached_tokens)
        return float(self._coef[1] * x[1] + self._coef[2] * x[2])

    @property
    def overhead_s(self) -> float:
        return float(self._coef[0])

    def ttft_s(self, cached_tokens: int, uncached_tokens: int, queued_s: float, num_decoding: float) -> float:
        return (
            self.overhead_s
            + queued_s
            + self.prior.interference_s * num_decoding
            + self.prefill_s(cached_tokens, uncached_tokens)
        )

    def observe(self, cached_tokens: int, prompt_tokens: int, ttft_s: float, queued_s: float) -> None:
        """One answered request. Only those that waited behind little are informative."""
        if queued_s > 0.25 * ttft_s or prompt_tokens <= 0 or ttft_s <= 0:
            return
        uncached = max(0, prompt_tokens - cached_tokens)
        x = self._features(cached_tokens, uncached)
        y = ttft_s - queued_s
        # Forget old samples, but never below the prior's own weight.
        self._xtx = self._forgetting * (self._xtx - self._prior_xtx) + self._prior_xtx + np.outer(x, x)
        self._xty = self._forgetting * (self._xty - self._prior_xty) + self._prior_xty + x * y
        self.num_samples += 1
        self._coef = self._solve()

    def describe(self) -> dict[str, float]:
        return {
            "overhead_s": self.overhead_s,
            "per_token_s": float(self._coef[1]),
            "attention_s": float(self._coef[2]),
            "num_samples": float(self.num_samples),
        }
