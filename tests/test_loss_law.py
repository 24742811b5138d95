"""The Chinchilla loss-law fitter (analysis.loss_law) on real and synthetic runs."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.loss_law import EXPONENT_BOUNDS, LossLaw, compute_optimal, fit_loss_law

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_fig4_points.csv"
# Besiroglu et al. 2024's refit of Chinchilla's approach 3 on these points (tests/data/README.md)
REFIT = LossLaw(E=1.82, A=482, B=2085, alpha=0.348, beta=0.366)


def _chinchilla():
    runs = pd.read_csv(CHINCHILLA)
    return runs["params"], runs["flops"] / (6 * runs["params"]), runs["loss"]


@pytest.fixture(scope="module")
def chinchilla_law():
    return fit_loss_law(*_chinchilla(), exclude_highest=5, n_boot=20)


def test_the_fit_reproduces_the_replications_refit_of_chinchilla(chinchilla_law):
    law = chinchilla_law
    assert law.n_points == 240 and law.excluded == 5
    for name in ("alpha", "beta", "E"):
        assert getattr(law, name) == pytest.approx(getattr(REFIT, name), rel=0.02), name
    for name in ("A", "B"):
        assert getattr(law, name) == pytest.approx(getattr(REFIT, name), rel=0.10), name
    intervals = law.intervals()
    for name in ("E", "A", "B", "alpha", "beta"):
        low, high = intervals[name]
        assert low < high and low <= getattr(law, name) * 1.001 and high >= getattr(law, name) * 0.999


def test_the_outlier_rule_matters_on_chinchilla():
    """With all 245 runs the optimum moves far from the refit (B ~ 12,800, beta ~ 0.45)."""
    law = fit_loss_law(*_chinchilla(), n_boot=0)
    assert law.excluded == 0 and law.n_points == 245
    assert law.beta > 0.42 and law.B > 6000


def test_compute_optimal_allocation_for_chinchillas_budget(chinchilla_law):
    """Chinchilla's own budget (5.76e23 FLOPs): the fit's N_opt and D_opt against the refit's."""
    ours, ref = compute_optimal(chinchilla_law, 5.76e23), compute_optimal(REFIT, 5.76e23)
    assert ours.params == pytest.approx(ref.params, rel=0.05)
    assert ours.tokens == pytest.approx(ref.tokens, rel=0.05)
    assert 6 * ours.params * ours.tokens == pytest.approx(5.76e23)
    assert ours.loss_band[0] <= ours.loss <= ours.loss_band[1]
    assert ours.params_band[0] < ours.params_band[1]


def _synthetic(law, experts=(1,), seed=0, noise=0.0):
    n, d, e = (v.ravel() for v in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6),
                                                np.asarray(experts, float)))
    loss = law(n, d, e) * np.exp(noise * np.random.default_rng(seed).standard_normal(len(n)))
    return n, d, loss, e


def test_known_coefficients_are_recovered_and_the_optimum_is_the_analytic_one():
    truth = LossLaw(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.3)
    n, d, loss, _ = _synthetic(truth)
    law = fit_loss_law(n, d, loss, n_boot=0)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(truth, name), rel=0.01), name
    # the closed form against a brute-force search along the budget's constraint
    budget = 1e21
    grid = np.geomspace(1e7, 1e12, 200001)
    best = grid[np.argmin(truth(grid, budget / (6 * grid)))]
    assert compute_optimal(truth, budget).params == pytest.approx(best, rel=1e-3)
    assert compute_optimal(law, budget).params == pytest.approx(best, rel=0.05)


def test_the_routed_extension_recovers_the_experts_exponent():
    truth = LossLaw(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.28, gamma=0.07)
    n, d, loss, e = _synthetic(truth, experts=(1, 8, 64), noise=0.002)
    law = fit_loss_law(n, d, loss, experts=e, n_boot=10)
    assert law.gamma == pytest.approx(truth.gamma, abs=0.01)
    assert law.alpha == pytest.approx(truth.alpha, rel=0.05)
    # more experts, same budget: a larger activated model is not needed, the loss is lower
    dense, moe = compute_optimal(law, 1e20), compute_optimal(law, 1e20, experts=64)
    assert moe.loss < dense.loss
    assert compute_optimal(truth, 1e20, experts=64).loss == pytest.approx(moe.loss, rel=0.01)


@pytest.mark.parametrize("kwargs,message", [
    ({"d": [1e9] * 6}, "one value of token counts"),
    ({"n": [1e6] * 6}, "one value of parameter counts"),
    ({"loss": [2.0, 2.1, -1.0, 2.2, 2.3, 2.4]}, "finite and positive"),
    ({"experts": [8] * 6}, "one value of expert counts"),
    ({"d": [1e9, 2e9]}, "differ in length"),
])
def test_runs_that_cannot_determine_the_law_are_refused(kwargs, message):
    args = {"n": [1e6, 2e6, 4e6, 1e6, 2e6, 4e6], "d": [1e9, 1e9, 1e9, 4e9, 4e9, 4e9],
            "loss": [3.0, 2.8, 2.7, 2.8, 2.6, 2.5], **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_loss_law(**args, n_boot=0)


# A ladder-sized grid (sizes over 12x, token counts over 16x) and a coarse grid of starts: the
# fitter's own code path at a cost a test can pay.
LADDER_N, LADDER_D = (v.ravel() for v in np.meshgrid(np.geomspace(45e3, 573e3, 4),
                                                     np.geomspace(256e3, 4.1e6, 4)))
COARSE = {"a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "e": (-1.0, 0.0, 1.0),
          "alpha": (0.0, 0.5, 1.0), "beta": (0.0, 0.5, 1.0)}


def test_bootstrap_intervals_hold_the_true_exponents():
    """Over 20 noise seeds (0.5% noise), the 95% intervals of the bootstrap refits hold the
    true alpha and beta at least 17 times each: every refit searches its resample as the full
    fit does, rather than stopping next to the full fit's optimum."""
    truth = LossLaw(E=1.0, A=60.0, B=400.0, alpha=0.3, beta=0.28)
    held = {"alpha": 0, "beta": 0}
    for seed in range(20):
        noise = np.exp(0.005 * np.random.default_rng(seed).standard_normal(len(LADDER_N)))
        law = fit_loss_law(LADDER_N, LADDER_D, truth(LADDER_N, LADDER_D) * noise, n_boot=20,
                           seed=seed, grid=COARSE, n_starts=4, boot_starts=1)
        for name in held:
            low, high = law.intervals()[name]
            held[name] += low <= getattr(truth, name) <= high
    assert min(held.values()) >= 17, held


@pytest.mark.parametrize("noise", [0.0, 0.005])
def test_a_ladder_flat_in_tokens_leaves_beta_undetermined(noise):
    """Losses that do not move with D: beta is reported (flat direction or at its bound), alpha
    is not."""
    loss = (1.0 + 60 / LADDER_N**0.3) * np.exp(
        noise * np.random.default_rng(1).standard_normal(len(LADDER_N)))
    law = fit_loss_law(LADDER_N, LADDER_D, loss, n_boot=10, grid=COARSE, n_starts=8)
    undetermined = law.undetermined()
    assert "beta" in undetermined and "alpha" not in undetermined
    assert "token counts" in undetermined["beta"]


def test_determined_and_undetermined_exponents():
    """The fit of a well-spread noiseless ladder determines everything; an interval spanning more
    than a factor 10, an exponent at its bound and E at zero are each reported."""
    truth = LossLaw(E=1.0, A=60.0, B=400.0, alpha=0.3, beta=0.28)
    law = fit_loss_law(LADDER_N, LADDER_D, truth(LADDER_N, LADDER_D), n_boot=5, grid=COARSE,
                       n_starts=8)
    assert law.undetermined() == {}
    wide = law.boot.copy()
    wide[:, 3] = np.linspace(0.05, 2.0, len(wide))
    assert "spans more than a factor 10" in replace(law, boot=wide).undetermined()["alpha"]
    assert "at a bound" in replace(law, beta=EXPONENT_BOUNDS[1]).undetermined()["beta"]
    assert "no floor" in replace(law, E=1e-9).undetermined()["E"]
