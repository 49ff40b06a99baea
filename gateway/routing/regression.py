"""Online least squares with a prior that never fades, for the gateway's cost models.

Each model (gateway.routing.cost_model, transfer_model, store_model) fits non-negative
rates from the requests it sees. The prior enters as weighted pseudo-samples, so a model is
sensible before any traffic; real samples are forgotten exponentially, but never below the
prior's own weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def solve_nonnegative(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """Least-squares coefficients from the normal equations, clipped at 0 (rates are never
    negative). The features span ~8 orders of magnitude (1, tokens, tokens²): the equations are
    scaled to unit diagonal first, or the solve loses the constant term entirely."""
    scale = np.sqrt(np.maximum(np.diag(xtx), 1e-300))
    scaled = np.linalg.solve(xtx / np.outer(scale, scale), xty / scale)
    return np.asarray(np.maximum(scaled / scale, 0.0), dtype=float)


class PriorLeastSquares:
    def __init__(self, prior_samples: Iterable[tuple[np.ndarray, float, float]], forgetting: float) -> None:
        """`prior_samples`: (features, target, weight) pseudo-samples that pin the prior."""
        samples = list(prior_samples)
        size = len(samples[0][0])
        self._prior_xtx = np.zeros((size, size))
        self._prior_xty = np.zeros(size)
        for x, y, weight in samples:
            self._prior_xtx += weight * np.outer(x, x)
            self._prior_xty += weight * x * y
        self._xtx, self._xty = self._prior_xtx.copy(), self._prior_xty.copy()
        self._forgetting = forgetting
        self.num_samples = 0
        self.coef = solve_nonnegative(self._xtx, self._xty)

    def add(self, x: np.ndarray, y: float) -> None:
        """One real sample; older ones count `forgetting` times less, the prior stays whole."""
        self._xtx = self._forgetting * (self._xtx - self._prior_xtx) + self._prior_xtx + np.outer(x, x)
        self._xty = self._forgetting * (self._xty - self._prior_xty) + self._prior_xty + x * y
        self.num_samples += 1
        self.coef = solve_nonnegative(self._xtx, self._xty)


class FixedPlusPerToken:
    """seconds(t tokens) = fixed + per_token · t, fitted online from a prior given at two sizes
    (the transfer and store-load models: a round trip or a lookup, then a rate)."""

    def __init__(self, fixed_s: float, per_token_s: float, weight: float, sizes: tuple[int, int],
                 forgetting: float) -> None:  # fmt: skip
        self._fit = PriorLeastSquares(
            ((np.array([1.0, float(t)]), fixed_s + per_token_s * t, weight) for t in sizes), forgetting
        )

    @property
    def num_samples(self) -> int:
        return self._fit.num_samples

    @property
    def fixed_s(self) -> float:
        return float(self._fit.coef[0])

    @property
    def per_token_s(self) -> float:
        return float(self._fit.coef[1])

    def add(self, tokens: int, seconds: float) -> None:
        self._fit.add(np.array([1.0, float(tokens)]), seconds)
