from __future__ import annotations

import pytest

from gateway.routing.cost_model import CostModel, CostPrior

# Representative (cached, uncached) sizes, as the gateway sees them.
POINTS = [(0, 256), (0, 1024), (0, 2048), (1024, 512), (2048, 256), (0, 4096), (0, 8192), (4096, 1024)]


def truth(overhead: float, per_token: float, attention: float):  # noqa: ANN201
    def ttft(cached: int, uncached: int) -> float:
        total = cached + uncached
        return overhead + per_token * uncached + attention * (total * total - cached * cached)

    return ttft


def mean_relative_error(model: CostModel, ttft) -> float:  # noqa: ANN001
    errors = [abs(model.ttft_s(c, u, 0.0, 0) - ttft(c, u)) / ttft(c, u) for c, u in POINTS]
    return sum(errors) / len(errors)


def test_prefill_grows_with_uncached_tokens() -> None:
    model = CostModel()
    sizes = [1, 64, 256, 1024, 4096, 16384]
    costs = [model.prefill_s(0, u) for u in sizes]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert model.prefill_s(0, 0) == 0.0


def test_prefill_is_superlinear_in_context() -> None:
    model = CostModel()
    # Eight times the tokens costs more than eight times as much (attention over the context).
    assert model.prefill_s(0, 8192) > 8 * model.prefill_s(0, 1024)
    # The same uncached tokens cost more behind a longer cached context.
    assert model.prefill_s(8192, 512) > model.prefill_s(1024, 512) > model.prefill_s(0, 512)
    # Cached tokens are cheaper than uncached ones.
    assert model.prefill_s(4000, 96) < model.prefill_s(0, 4096)


def test_ttft_adds_queue_and_interference() -> None:
    model = CostModel(CostPrior(interference_s=0.01))
    base = model.ttft_s(0, 1000, 0.0, 0)
    assert model.ttft_s(0, 1000, 2.5, 0) == pytest.approx(base + 2.5)
    assert model.ttft_s(0, 1000, 0.0, 3) == pytest.approx(base + 0.03)


def test_uncalibrated_model_reproduces_its_prior() -> None:
    # The prior's pseudo-samples lie exactly on the prior's curve, so before any traffic the
    # fitted coefficients must be the prior's.
    prior = CostPrior()
    model = CostModel(prior)
    assert model.describe()["num_samples"] == 0
    assert model.overhead_s == pytest.approx(prior.overhead_s, rel=0.01)
    assert model.describe()["per_token_s"] == pytest.approx(prior.per_token_s, rel=0.01)
    assert model.describe()["attention_s"] == pytest.approx(prior.attention_s, rel=0.01)
    assert model.ttft_s(0, 256, 0.0, 0) == pytest.approx(truth(prior.overhead_s, prior.per_token_s, prior.attention_s)(0, 256), rel=0.01)


def test_observations_move_estimates_toward_truth() -> None:
    # The engine is twice as slow as the prior assumes, in every term.
    real = truth(0.02, 1.4e-4, 1.8e-8)
    model = CostModel()
    before = mean_relative_error(model, real)
    big_before = model.ttft_s(0, 8192, 0.0, 0)
    for i in range(200):
        cached, uncached = POINTS[i % len(POINTS)]
        model.observe(cached, cached + uncached, real(cached, uncached), queued_s=0.0)
    after = mean_relative_error(model, real)
    assert model.num_samples == 200
    assert after < 0.5 * before
    # The long-prompt estimate moved up toward the (slower) truth.
    assert big_before < model.ttft_s(0, 8192, 0.0, 0) <= real(0, 8192) * 1.05
    coefficients = model.describe()
    assert all(coefficients[k] >= 0 for k in ("overhead_s", "per_token_s", "attention_s"))


def test_observations_of_a_faster_engine_lower_estimates() -> None:
    real = truth(0.005, 3.5e-5, 4.5e-9)  # half the prior
    model = CostModel()
    before = model.ttft_s(0, 4096, 0.0, 0)
    for i in range(200):
        cached, uncached = POINTS[i % len(POINTS)]
        model.observe(cached, cached + uncached, real(cached, uncached), queued_s=0.0)
    assert real(0, 4096) * 0.95 <= model.ttft_s(0, 4096, 0.0, 0) < before


def test_samples_that_waited_in_queue_are_ignored() -> None:
    model = CostModel()
    before = model.describe()
    estimate = model.ttft_s(0, 2048, 0.0, 0)
    for _ in range(50):
        model.observe(0, 2048, ttft_s=10.0, queued_s=5.0)  # mostly queueing: says nothing about prefill
    assert model.describe() == before
    assert model.num_samples == 0
    assert model.ttft_s(0, 2048, 0.0, 0) == estimate


def test_degenerate_samples_are_ignored() -> None:
    model = CostModel()
    before = model.describe()
    model.observe(0, 0, 0.5, 0.0)
    model.observe(0, 100, 0.0, 0.0)
    model.observe(0, 100, -1.0, 0.0)
    assert model.describe() == before


def test_small_queue_is_subtracted_from_the_sample() -> None:
    real = truth(0.02, 1.4e-4, 1.8e-8)
    waited, clean = CostModel(), CostModel()
    for i in range(100):
        cached, uncached = POINTS[i % len(POINTS)]
        y = real(cached, uncached)
        clean.observe(cached, cached + uncached, y, queued_s=0.0)
        waited.observe(cached, cached + uncached, y + 0.1 * y, queued_s=0.1 * y)  # waited, below the cut
    assert waited.num_samples == 100
    assert waited.describe() == pytest.approx(clean.describe(), rel=1e-6)


def test_interference_per_running_request_is_learned() -> None:
    # Engines where each running request delays a new prefill by 20 ms (the prior says 5 ms).
    real = truth(0.012, 8e-5, 1e-8)
    model = CostModel()
    assert model.interference_s == pytest.approx(CostPrior().interference_s, rel=0.01)
    for _ in range(30):
        for (cached, uncached), running in zip(POINTS, [0, 1, 2, 4, 6, 8, 0, 3], strict=True):
            model.observe(cached, cached + uncached, real(cached, uncached) + 0.02 * running, 0.0, running)
    assert model.interference_s == pytest.approx(0.02, rel=0.15)
    assert model.ttft_s(2048, 64, 0.0, 6) == pytest.approx(real(2048, 64) + 0.12, rel=0.15)
