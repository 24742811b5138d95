"""Scaling-law fits: a power law of a metric against compute, and Clark et al.'s routed law.

Both fit in log space with a robust loss (Cauchy for the power law, soft-L1 for the routed law),
so a diverged or noisy point bends the fit less than under least squares, and give bootstrap
confidence intervals by refitting on resampled points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares


@dataclass
class PowerLaw:
    """y = a * x^b, fitted on log y = log a + b log x."""

    a: float
    b: float
    b_low: float  # bootstrap 2.5% / 97.5% quantiles of the exponent
    b_high: float
    n_points: int
    boot_log_a: np.ndarray  # bootstrap replicates, for bands
    boot_b: np.ndarray

    def __call__(self, x):
        return self.a * np.asarray(x, float) ** self.b

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band of the fitted curve at `x`."""
        logx = np.log(np.asarray(x, float))
        curves = self.boot_log_a[:, None] + self.boot_b[:, None] * logx[None]
        lo, hi = np.quantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return np.exp(lo), np.exp(hi)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("boot_log_a"), d.pop("boot_b")
        return d


def _robust_line(logx: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """Cauchy-loss line fit, scaled by the robust spread (MAD) of the least-squares residuals:
    a point many spreads away has almost no pull."""
    start = np.polyfit(logx, logy, 1)[::-1]
    resid = start[0] + start[1] * logx - logy
    scale = max(1.4826 * np.median(np.abs(resid - np.median(resid))), 1e-3)
    return least_squares(lambda p: p[0] + p[1] * logx - logy, start, loss="cauchy",
                         f_scale=1.5 * scale).x


def fit_power_law(x, y, n_boot: int = 500, seed: int = 0) -> PowerLaw:
    """Fit y = a x^b on the points with x, y > 0 (at least 3 distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 3:
        raise ValueError(f"a power law needs at least 3 distinct positive x, got {len(np.unique(x))}")
    logx, logy = np.log(x), np.log(y)
    log_a, b = _robust_line(logx, logy)
    rng = np.random.default_rng(seed)
    boots = []
    while len(boots) < n_boot:
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(logx[idx])) >= 2:
            boots.append(_robust_line(logx[idx], logy[idx]))
    boots = np.asarray(boots)
    b_low, b_high = np.quantile(boots[:, 1], [0.025, 0.975])
    return PowerLaw(float(np.exp(log_a)), float(b), float(b_low), float(b_high), len(x),
                    boots[:, 0], boots[:, 1])


def saturating_experts(e, e_start: float = 1.0, e_max: float = 1e4):
    """Clark et al.'s Ê: 1/Ê = 1/(E - e_start + 1/(1/e_start - 1/e_max)) + 1/e_max; Ê(e_start) =
    e_start, Ê ~ E in between, saturating at e_max. Defaults: no saturation within reach."""
    e = np.asarray(e, float)
    return 1.0 / (1.0 / (e - e_start + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


@dataclass
class RoutedLaw:
    """log L = a log N + b log Ê + c log N log Ê + d (Clark et al. 2022, eq. 6)."""

    a: float
    b: float
    c: float
    d: float
    intervals: dict  # name -> (2.5%, 97.5%) bootstrap quantiles

    def __call__(self, n, e):
        logn, loge = np.log(np.asarray(n, float)), np.log(saturating_experts(e))
        return np.exp(self.a * logn + self.b * loge + self.c * logn * loge + self.d)

    def summary(self) -> dict:
        return asdict(self)


def fit_routed_law(n, e, loss, n_boot: int = 300, seed: int = 0) -> RoutedLaw:
    """Fit the routed law to loss at activated size `n` and expert count `e` (E = 1: dense)."""
    n, e, loss = (np.asarray(v, float) for v in (n, e, loss))
    design = np.stack([np.log(n), np.log(saturating_experts(e)),
                       np.log(n) * np.log(saturating_experts(e)), np.ones_like(n)], axis=1)
    target = np.log(loss)
    if np.linalg.matrix_rank(design) < 4:
        raise ValueError("the routed law needs runs that vary both the size and the expert count")

    def solve(rows):
        start = np.linalg.lstsq(design[rows], target[rows], rcond=None)[0]
        return least_squares(lambda p: design[rows] @ p - target[rows], start, loss="soft_l1",
                             f_scale=0.05).x

    coef = solve(np.arange(len(n)))
    rng = np.random.default_rng(seed)
    boots = []
    while len(boots) < n_boot:
        rows = rng.integers(0, len(n), len(n))
        if np.linalg.matrix_rank(design[rows]) == 4:
            boots.append(solve(rows))
    q = np.quantile(np.asarray(boots), [0.025, 0.975], axis=0)
    names = ("a", "b", "c", "d")
    return RoutedLaw(*map(float, coef), {k: (float(q[0, i]), float(q[1, i]))
                                          for i, k in enumerate(names)})


MIN_FIT_POINTS = 4  # no curve through fewer points: 3 points fix a 2-parameter law too loosely


def honest_fit(x, y, stats: pd.DataFrame, metric: str) -> dict | None:
    """A power law y = a x^b of `metric` fitted to every seed's (x, y), kept for drawing only
    when it passes through at least MIN_FIT_POINTS distinct x and every point's seed mean lies
    within that point's seed std of the curve (so a single-seed study never draws one).

    Args:
      x, y: per run (seeds not pooled).
      stats: per point, columns x, mean, std, count (the seeds' statistics of y).
    Returns: {"law", "drawn", "rms_error" (of the point means, y units), "reason" (why not
      drawn), "metric"}; None when there are too few points or nothing positive to fit.
    """
    stats = stats[np.isfinite(stats["mean"]) & (stats["mean"] > 0) & (stats["x"] > 0)]
    if stats["x"].nunique() < MIN_FIT_POINTS:
        return None
    try:
        law = fit_power_law(x, y)
    except ValueError:
        return None
    resid = stats["mean"].to_numpy() - law(stats["x"].to_numpy())
    rms = float(np.sqrt(np.mean(resid ** 2)))
    outside = np.abs(resid) > stats["std"].to_numpy()
    reason = ("" if not outside.any() else
              f"{int(outside.sum())} of {len(resid)} point means lie further from the curve "
              "than their seed std" + (" (one seed: no spread)" if stats["count"].max() < 2
                                       else ""))
    return {"law": law, "drawn": not outside.any(), "rms_error": rms, "reason": reason,
            "metric": metric}
