"""The laws over the expert count and the granularity (analysis.moe_law) and the choice between
forms (analysis.law_choice): known coefficients
are recovered with intervals that hold them, the held-out comparison picks the form the runs
were drawn from, and runs that cannot determine a form are refused with the axis to add."""

import numpy as np
import pandas as pd
import pytest

from analysis.loss_law import LossLaw
from analysis.law_choice import compare_forms, folds, held_out_error, points
from analysis.moe_law import GranularityLaw, JointLaw, fit_granularity_law, fit_joint_law

# Sizes over 1000x, token counts over 1000x; a coarse grid of starts (the fitter's own code
# path at a cost a test can pay).
N, D = np.geomspace(1e6, 1e9, 4), np.geomspace(1e8, 1e11, 4)
COARSE = {"a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "c": (-1.0, 0.0, 1.0),
          "alpha": (0.0, 0.5, 1.0), "beta": (0.0, 0.5, 1.0)}
QUICK = {"n_boot": 20, "grid": COARSE, "n_starts": 4, "boot_starts": 1}
GRIDS = {"chinchilla": {**COARSE, "e": COARSE["c"]}, "joint": COARSE, "granularity": COARSE}
# Signs as in the module docstring: loss falls with N and D; the gain of experts grows with N.
JOINT_TRUTH = JointLaw(a=300.0, b=900.0, c=1.5, alpha=0.3, beta=0.28, gamma=0.01, delta=0.05,
                       zeta=0.005, omega=-0.05)
# Krajewski et al.'s published fit (a, b, c, alpha, beta, gamma) with a 4x larger granularity
# term g, which 0.5% noise on this grid resolves to ~10%.
GRANULARITY_TRUTH = GranularityLaw(a=18.1, b=30.8, c=0.47, g=8.0, alpha=0.115, beta=0.147,
                                   gamma=0.58)


def _runs(law, x, seed, noise=0.005):
    """The grid N x D x `x` ([R] each) and the losses of `law` on it with multiplicative noise."""
    n, d, x = (v.ravel() for v in np.meshgrid(N, D, np.asarray(x, float)))
    noise = np.exp(noise * np.random.default_rng(seed).standard_normal(len(n)))
    return n, d, law(n, d, x) * noise, x


def _check_recovery(truth, fit, x, tolerance, seeds=range(5)):
    """Fits over noise seeds: every coefficient within `tolerance` (relative) of the truth,
    the predicted losses within 1.5% (of 0.5% noise), and each exponent's 95% interval holding
    the true value in at least 4 of the 5 seeds."""
    held = dict.fromkeys(("alpha", "beta", "gamma"), 0)
    for seed in seeds:
        n, d, loss, xs = _runs(truth, x, seed)
        law = fit(n, d, loss, xs, seed=seed, **QUICK)
        for name, tol in tolerance.items():
            assert getattr(law, name) == pytest.approx(getattr(truth, name), rel=tol), (name, seed)
        assert np.abs(law(n, d, xs) / truth(n, d, xs) - 1).max() < 0.015, seed
        for name in held:
            low, high = law.intervals()[name]
            held[name] += low <= getattr(truth, name) <= high
    assert min(held.values()) >= 4, held


def test_the_joint_law_recovers_known_coefficients():
    """4 sizes x 4 token counts x E in (1, 4, 16, 64), 0.5% noise: exponents within 4% (their
    interactions gamma and zeta within 40%, Ê's powers within 0.06 of the truth's +-0.05)."""
    _check_recovery(JOINT_TRUTH, fit_joint_law, (1, 4, 16, 64),
                    {"alpha": 0.04, "beta": 0.04, "c": 0.05, "a": 0.15, "b": 0.15,
                     "gamma": 0.4, "zeta": 0.6})
    n, d, loss, e = _runs(JOINT_TRUTH, (1, 4, 16, 64), seed=0)
    law = fit_joint_law(n, d, loss, e, n_boot=0, grid=COARSE, n_starts=4)
    assert law.delta == pytest.approx(JOINT_TRUTH.delta, abs=0.06)
    assert law.omega == pytest.approx(JOINT_TRUTH.omega, abs=0.06)


def test_the_granularity_law_recovers_known_coefficients():
    """4 sizes x 4 token counts x G in (1, 2, 4, 8, 16) at one expert count, 0.5% noise."""
    _check_recovery(GRANULARITY_TRUTH, fit_granularity_law, (1, 2, 4, 8, 16),
                    {"alpha": 0.05, "beta": 0.1, "gamma": 0.15, "g": 0.15, "a": 0.05, "b": 0.2,
                     "c": 0.35})


def test_a_law_at_one_value_is_the_chinchilla_law_it_reduces_to():
    n, d = np.geomspace(1e6, 1e9, 5), np.geomspace(1e8, 1e11, 5)
    for e in (1, 8, 64):
        assert JOINT_TRUTH.at(e)(n, d) == pytest.approx(JOINT_TRUTH(n, d, e), rel=1e-12)
    dense = LossLaw(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.28)
    assert JOINT_TRUTH(n, d, 1) == pytest.approx(dense(n, d), rel=1e-12)  # E = 1: Chinchilla
    for g in (1, 4):
        assert GRANULARITY_TRUTH.at(g)(n, d) == pytest.approx(GRANULARITY_TRUTH(n, d, g),
                                                              rel=1e-12)


def _points(n, d, loss, experts=1.0, granularity=1.0):
    return pd.DataFrame({"n": n, "d": d, "loss": loss, "experts": experts,
                         "granularity": granularity})


@pytest.mark.parametrize("truth,expected", [
    (JOINT_TRUTH, "joint"),
    (LossLaw(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.28, gamma=0.07), "chinchilla"),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_held_out_comparison_over_experts_picks_the_true_form(truth, expected, seed):
    """Runs drawn from the joint law: the routed Chinchilla law cannot follow exponents that
    move with E and the joint form wins; runs drawn from the routed law (which the joint law
    nests): the joint form is no better held out, and the form of fewer coefficients wins."""
    n, d, loss, e = _runs(truth, (1, 4, 16, 64), seed)
    (comparison,) = compare_forms(_points(n, d, loss, e), n_boot=0, n_starts=8,
                                  fold_starts=6, grids=GRIDS)
    assert comparison.axis == "experts" and set(comparison.held_out) == {"chinchilla", "joint"}
    assert comparison.chosen == expected, comparison.held_out
    assert min(comparison.held_out.values()) < 0.007  # the true form: the noise (0.5%)


@pytest.mark.parametrize("truth,expected", [
    (GRANULARITY_TRUTH, "granularity"),
    (GranularityLaw(a=18.1, b=30.8, c=0.47, g=1e-9, alpha=0.115, beta=0.147, gamma=0.58),
     "chinchilla"),
])
def test_the_held_out_comparison_over_granularity_picks_the_true_form(truth, expected):
    """At one expert count: runs whose loss falls with G pick the granularity law; runs whose
    loss does not move with G pick Chinchilla's."""
    n, d, loss, g = _runs(truth, (1, 2, 4, 8, 16), seed=0)
    (comparison,) = compare_forms(_points(n, d, loss, 8.0, g), n_boot=0, n_starts=8,
                                  fold_starts=6, grids=GRIDS)
    assert comparison.axis == "granularity" and comparison.experts == 8
    assert comparison.chosen == expected, comparison.held_out


def test_folds_keep_the_seeds_of_a_configuration_together_and_are_shared():
    n, d, loss, e = _runs(JOINT_TRUTH, (1, 8), seed=0)
    pts = _points(np.tile(n, 2), np.tile(d, 2), np.tile(loss, 2), np.tile(e, 2))  # 2 seeds
    fold = folds(pts, k=10, seed=3)
    assert set(fold) == set(range(10)) and (fold[: len(n)] == fold[len(n):]).all()
    assert (folds(pts.assign(loss=pts["loss"] * 2), k=10, seed=3) == fold).all()
    assert len(set(folds(pts.iloc[:6], k=10))) == 6  # fewer configurations: leave one out


def test_the_table_reads_granularity_as_1_where_missing():
    table = pd.DataFrame({"activated_params": [1e6, 2e6, 3e6], "train_tokens": [1e9] * 3,
                          "val_loss": [3.0, np.nan, 2.8], "n_experts": [0, 8, 8],
                          "granularity": [np.nan, 2.0, 4.0], "status": ["FINISHED"] * 3})
    pts = points(table)
    assert list(pts["experts"]) == [1.0, 8.0] and list(pts["granularity"]) == [1.0, 4.0]
    assert list(points(table.drop(columns="granularity"))["granularity"]) == [1.0, 1.0]


@pytest.mark.parametrize("fit,x,message", [
    (fit_joint_law, [8] * 8, "one value of expert counts (E)"),
    (fit_granularity_law, [2] * 8, "one value of granularities (G)"),
    (fit_joint_law, [1, 8] * 4, "8 runs for 9 coefficients: add runs"),
])
def test_runs_that_cannot_determine_a_law_are_refused_naming_the_axis(fit, x, message):
    n, d = [1e6, 2e6, 4e6, 8e6] * 2, [1e9] * 4 + [4e9] * 4
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit(n, d, np.linspace(3.0, 2.5, 8), x, n_boot=0)


def test_a_form_the_runs_cannot_determine_is_skipped_with_the_reason():
    """One token count: both forms skipped, naming it, and nothing chosen; a fold that would
    take away the only runs of an expert count is named in the held-out error's refusal."""
    n, d, loss, e = _runs(JOINT_TRUTH, (1, 8), seed=0)
    one_d = _points(n, np.full_like(d, 1e9), loss, e)
    (comparison,) = compare_forms(one_d, n_boot=0)
    assert comparison.chosen is None and not comparison.laws
    assert all("one value of token counts" in why for why in comparison.skipped.values())
    lone = _points(np.append(n[e == 1], 1e7), np.append(d[e == 1], 1e10),
                   np.append(loss[e == 1], 2.0), np.append(e[e == 1], 8.0))
    with pytest.raises(ValueError, match=r"without fold \d .*one value of expert counts"):
        held_out_error("joint", lone, n_starts=2, grid=COARSE)
    assert compare_forms(_points(n, d, loss)) == []  # neither E nor G varies
