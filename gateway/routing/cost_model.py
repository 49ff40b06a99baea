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


def solve_nonnegative(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """Least-squares coefficients from the normal equations, clipped at 0 (rates are never
    negative). The features span ~8 orders of magnitude (1, tokens, tokens²): the equations are
    scaled to unit diagonal first, or the solve loses the constant term entirely."""
    scale = np.sqrt(np.maximum(np.diag(xtx), 1e-300))
    scaled = np.linalg.solve(xtx / np.outer(scale, scale), xty / scale)
    return np.asarray(np.maximum(scaled / scale, 0.0), dtype=float)


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
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        # The interference prior is a guess (it depends on the model and the batch), so its
        # points count for less than the prefill ones.
        for c, u, r, w in ((0, 256, 0, 1.0), (0, 2048, 0, 1.0), (2048, 256, 0, 1.0), (0, 8192, 0, 1.0),
                           (2048, 256, 4, 0.2), (0, 2048, 8, 0.2)):  # fmt: skip
            x = self._features(c, u, r)
            y = p.overhead_s + p.per_token_s * u + p.attention_s * x[2] + p.interference_s * r
            self._xtx += w * p.weight * np.outer(x, x)
            self._xty += w * p.weight * x * y
        self._prior_xtx, self._prior_xty = self._xtx.copy(), self._xty.copy()
        self.num_samples = 0
        self._coef = self._solve()

    @staticmethod
    def _features(cached: int, uncached: int, running: float = 0.0) -> np.ndarray:
        total = cached + uncached
        return np.array([1.0, float(uncached), float(total * total - cached * cached), float(running)])

    def _solve(self) -> np.ndarray:
        return solve_nonnegative(self._xtx, self._xty)

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
            "interference_s": self.interference_s,
            "num_samples": float(self.num_samples),
        }
