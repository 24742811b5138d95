"""The Chinchilla loss law L(N, D) = E + A / N^alpha + B / D^beta, fitted the way Hoffmann et
al. (2022) fit it in their approach 3, its routed extension over the expert count, and the
compute-optimal allocation it implies.

Source: Hoffmann et al. 2022, section 3.3 and appendix D.2, with the fitting details of the
replication by Besiroglu et al. 2024 (arXiv 2404.10102): the law is written in log space as
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e; the loss is
the Huber loss (delta 1e-3) of the log residuals, summed; L-BFGS-B minimises it from every point
of a grid of starts and the best end point wins. Intervals come from refitting bootstrap
resamples of the runs, each refit searching its resample from a grid of starts as the full fit
does; `LossLaw.undetermined` names what the runs leave open.

The routed extension multiplies the parameter term by Ê^-gamma, with Ê Clark et al.'s
saturating transform of the expert count E (2022, arXiv 2202.01169, eq. 9): at fixed activated
parameters N, more experts lower the loss as a power of Ê. E = 1 is a dense model. (The letter E
is overloaded: `E` below is the irreducible loss, as in Chinchilla; expert counts are
`experts`.)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

from analysis.fit import saturating_experts

# Besiroglu et al.'s grid of starting points (4,500 combinations; 13,500 with gamma).
GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0), "gamma": (0.0, 0.5, 1.0)}
NAMES = ("a", "b", "e", "alpha", "beta", "gamma")
HUBER_DELTA = 1e-3
# alpha and beta stay within these (the grid starts within 0..2; fits of published ladders land
# within 0.2..0.9): an exponent at either bound is one the runs do not determine.
EXPONENT_BOUNDS = (0.0, 4.0)
EXPONENT_FLOOR = 0.01  # an exponent below this leaves its term constant across any ladder
EXPONENT_SPAN = 10.0  # a 95% interval whose ends differ by more than this factor says little
CHINCHILLA_FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D (Kaplan et al. 2020; Hoffmann et al. 2022)


@dataclass(frozen=True)
class LossLaw:
    """L(N, D, experts) = E + A / (N^alpha Ê^gamma) + B / D^beta; gamma = 0 is Chinchilla's law.

    N: (activated) parameters; D: training tokens; Ê: `saturating_experts(experts)`.
    `boot` holds the bootstrap refits' coefficients ([n_boot, 6]: log A, log B, log E, alpha,
    beta, gamma), for intervals of anything computed from the law. `scatter`, `n_range` and
    `d_range` (NaN for a law not fitted) describe the runs, for `undetermined`.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    gamma: float = 0.0
    n_points: int = 0
    excluded: int = 0  # highest-loss runs left out (the outlier rule)
    objective: float = float("nan")  # summed Huber loss at the optimum
    scatter: float = math.nan  # RMS of the fitted runs' log residuals
    n_range: tuple[float, float] = (math.nan, math.nan)  # the fitted runs' smallest, largest N
    d_range: tuple[float, float] = (math.nan, math.nan)  # ... and D
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)), repr=False)

    @property
    def theta(self) -> np.ndarray:
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta,
                         self.gamma])

    @classmethod
    def of(cls, theta, **kw) -> "LossLaw":
        a, b, e, alpha, beta, gamma = map(float, theta)
        return cls(np.exp(e), np.exp(a), np.exp(b), alpha, beta, gamma, **kw)

    def __call__(self, n, d, experts=1.0):
        """Predicted loss at parameters `n`, tokens `d` and `experts` (broadcast, float64)."""
        return np.exp(_log_predict(self.theta, *_logs(n, d, experts)))

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Bootstrap quantile interval of each coefficient (empty without bootstrap refits)."""
        if not len(self.boot):
            return {}
        q = np.quantile(self.boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
        values = {"A": np.exp(q[:, 0]), "B": np.exp(q[:, 1]), "E": np.exp(q[:, 2]),
                  "alpha": q[:, 3], "beta": q[:, 4], "gamma": q[:, 5]}
        return {k: (float(v[0]), float(v[1])) for k, v in values.items()}

    def replicates(self) -> list["LossLaw"]:
        """The bootstrap refits as laws."""
        return [LossLaw.of(t) for t in self.boot]

    def undetermined(self, level: float = 0.95) -> dict[str, str]:
        """The coefficients the runs do not determine, each with the reason (empty: none).

        alpha or beta: at a bound of EXPONENT_BOUNDS (within EXPONENT_FLOOR); or a flat
        direction, its term moving the predicted loss across the runs' range of N (or D) by
        less than twice their scatter about the fit (HUBER_DELTA at least); or its bootstrap
        interval reaching below EXPONENT_FLOOR or spanning more than a factor EXPONENT_SPAN.
        E: below 1% of the loss predicted at the runs' largest N and D (no floor in the runs).
        gamma (routed fits): an interval that holds 0.
        """
        out, iv = {}, self.intervals(level)
        (n0, n1), (d0, d1) = self.n_range, self.d_range
        visible, (lo, hi) = max(HUBER_DELTA, 2 * self.scatter), EXPONENT_BOUNDS
        for name, what, runs, effect in (
                ("alpha", "parameter counts", self.n_range, np.log(self(n0, d1) / self(n1, d1))),
                ("beta", "token counts", self.d_range, np.log(self(n1, d0) / self(n1, d1)))):
            value = getattr(self, name)
            low, high = iv.get(name, (value, value))
            fix = f"add runs whose {what} span more than {runs[0]:.3g} to {runs[1]:.3g}"
            if not lo + EXPONENT_FLOOR < value < hi - EXPONENT_FLOOR:
                out[name] = f"{name} = {value:.3g} is at a bound of [{lo:g}, {hi:g}]; {fix}"
            elif effect < visible:
                out[name] = (f"flat: its term moves the predicted loss by {effect:.2%} across the "
                             f"runs, within their scatter ({visible:.2%}); {fix}")
            elif low < EXPONENT_FLOOR or high > EXPONENT_SPAN * low:
                out[name] = (f"its {level:.0%} interval [{low:.3g}, {high:.3g}] spans more than "
                             f"a factor {EXPONENT_SPAN:g}; {fix}")
        if self.E < 0.01 * self(n1, d1):
            out["E"] = (f"E = {self.E:.3g}: the runs show no floor, so the law predicts none and "
                        "its losses fall without limit beyond them")
        if self.gamma and "gamma" in iv and iv["gamma"][0] < 0 < iv["gamma"][1]:
            out["gamma"] = (f"its {level:.0%} interval [{iv['gamma'][0]:.3g}, "
                            f"{iv['gamma'][1]:.3g}] holds 0: the runs do not show whether more "
                            "experts lower the loss")
        return out

    def summary(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "gamma": self.gamma, "n_points": self.n_points, "excluded": self.excluded,
                "objective": self.objective, "scatter": self.scatter, "n_range": self.n_range,
                "d_range": self.d_range, "n_boot": len(self.boot),
                "intervals_95": self.intervals(), "undetermined": self.undetermined()}


def _logs(n, d, experts):
    n, d, experts = np.broadcast_arrays(*(np.asarray(v, float) for v in (n, d, experts)))
    return np.log(n), np.log(d), np.log(saturating_experts(experts))


def _terms(theta, logn, logd, loge):
    """[3, ...] the law's three terms in log space; `theta`'s entries may be [S, 1] columns."""
    a, b, e, alpha, beta, gamma = theta
    return np.stack(np.broadcast_arrays(a - alpha * logn - gamma * loge, b - beta * logd,
                                        e + np.zeros_like(logn)), axis=0)


def huber(r):
    small = np.abs(r) <= HUBER_DELTA
    return np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)), small


def _log_predict(theta, logn, logd, loge):
    return logsumexp(_terms(theta, logn, logd, loge), axis=0)


def _objective(theta, logn, logd, loge, logl, free):
    """Summed Huber loss of the log residuals in units of HUBER_DELTA^2, and its gradient over
    the free coefficients. The unit matters: L-BFGS-B stops once a step lowers the objective by
    less than 2.2e-9 max(|f|, 1), and the summed loss is ~1e-4 near an optimum, so in its own
    units every run stopped a few steps from where it started."""
    terms = _terms(_expand(theta, free), logn, logd, loge)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)  # logsumexp and its softmax in one pass
    total = weights.sum(axis=0)
    r = top + np.log(total) - logl
    loss = huber(r)[0].sum() / HUBER_DELTA**2
    w = weights / total * (np.clip(r / HUBER_DELTA, -1, 1) / HUBER_DELTA)  # d lse/d term x slope
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] @ logn), -(w[1] @ logd),
                     -(w[0] @ loge)])
    return loss, grad[free]


def _expand(theta, free):
    full = np.zeros(6)
    full[free] = theta
    return full


def _centring(shift):
    """[6, 6] the map from coefficients on the logs to those on the logs less `shift` (means
    of log N, log D, log Ê): a' = a - alpha s_N - gamma s_E, b' = b - beta s_D. The same law;
    L-BFGS-B needs half the iterations once a no longer moves with alpha."""
    t = np.eye(6)
    t[0, 3], t[0, 5], t[1, 4] = -shift[0], -shift[2], -shift[1]
    return t


def _minimise(start, data, free):
    """L-BFGS-B from `start` ([6]), exponents within EXPONENT_BOUNDS: the end point ([6]) and
    its summed Huber loss."""
    *logs, logl = data
    shift = np.array([v.mean() for v in logs])
    t = _centring(shift)
    bounds = [EXPONENT_BOUNDS if NAMES[i] in ("alpha", "beta") else (None, None)
              for i in np.flatnonzero(free)]
    centred = tuple(v - c for v, c in zip(logs, shift))
    result = minimize(_objective, (t @ start)[free], args=(*centred, logl, free), jac=True,
                      method="L-BFGS-B", bounds=bounds)
    return np.linalg.solve(t, _expand(result.x, free)), float(result.fun) * HUBER_DELTA**2


def _starts(values, data, n_starts):
    """The grid's combinations of `values` ([S, 6]); with `n_starts`, only the n_starts of
    lowest objective (evaluated at every combination at once)."""
    grid = np.array(list(itertools.product(*values)))
    if n_starts is None or n_starts >= len(grid):
        return grid
    *logs, logl = data
    objective = huber(logsumexp(_terms(grid.T[:, :, None], *logs), axis=0) - logl)[0].sum(-1)
    return grid[np.argsort(objective, kind="stable")[:n_starts]]


def _search(starts, data, free):
    """The lowest end point of L-BFGS-B runs from each of `starts` ([S, 6]): ([6], its loss)."""
    best, best_loss = None, np.inf
    for start in starts:
        theta, loss = _minimise(start, data, free)
        if np.isfinite(loss) and np.all(np.isfinite(theta)) and loss < best_loss:
            best, best_loss = theta, loss
    return best, best_loss


def fit_loss_law(n, d, loss, experts=None, *, exclude_highest: int = 0, n_boot: int = 100,
                 seed: int = 0, grid: dict | None = None, n_starts: int | None = 200,
                 boot_starts: int = 4) -> LossLaw:
    """Fit L(N, D[, experts]) to runs by Chinchilla's approach 3.

    Args:
      n: [R] parameters of each run (activated parameters for MoE runs), > 0.
      d: [R] training tokens of each run, > 0.
      loss: [R] final loss of each run (nats/token), > 0.
      experts: optional [R] expert counts (1 = dense). With it the routed extension's gamma is
        fitted too; without it gamma stays 0.
      exclude_highest: leave out this many runs with the highest loss before fitting (the
        replication's outlier rule drops 5 of Chinchilla's 245).
      n_boot: bootstrap refits (runs resampled with replacement) for `LossLaw.intervals` and
        bands; 0 for none.
      seed: of the bootstrap resampling.
      grid: starting values per coefficient (`GRID` by default).
      n_starts: L-BFGS-B runs from the `n_starts` grid combinations of lowest objective and
        the lowest end point wins; None runs it from every combination (Besiroglu et al.'s
        procedure exactly: ~100x slower, the same optimum on the Chinchilla runs).
      boot_starts: each bootstrap refit searches its resample as the full fit searches the
        runs: L-BFGS-B from the `boot_starts` grid combinations of lowest objective on the
        resample and from the full fit's optimum, the lowest end point winning.

    Returns:
      The fitted LossLaw, with `n_points` used, `excluded`, the ranges of N and D it saw and
      its bootstrap refits.

    Raises:
      ValueError: fewer runs than free coefficients + 1, non-positive values, or a
        coefficient that the runs cannot determine (one N, one D, or one expert count).
    """
    n, d, loss = (np.asarray(v, float).ravel() for v in (n, d, loss))
    routed = experts is not None
    experts = np.ones_like(n) if experts is None else np.asarray(experts, float).ravel()
    if not len(n) == len(d) == len(loss) == len(experts):
        raise ValueError(f"n, d, loss and experts differ in length: {len(n)}, {len(d)}, "
                         f"{len(loss)}, {len(experts)}")
    for name, values in (("n (parameters)", n), ("d (tokens)", d), ("loss", loss),
                         ("experts", experts)):
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if len(bad):
            raise ValueError(f"{name} must be finite and positive; runs {bad[:5].tolist()} "
                             f"have {values[bad[:5]].tolist()}")
    keep = np.argsort(loss, kind="stable")[: len(loss) - exclude_highest]
    n, d, loss, experts = n[keep], d[keep], loss[keep], experts[keep]
    free = np.array([True] * 5 + [routed])
    for name, values in (("parameter counts", n), ("token counts", d)) + (
            (("expert counts", experts),) if routed else ()):
        if len(np.unique(values)) < 2:
            raise ValueError(f"the runs have one value of {name}: the law cannot separate its "
                             "term; add runs that vary it")
    if len(n) <= free.sum():
        raise ValueError(f"{len(n)} runs for {free.sum()} coefficients: add runs")
    data = (*_logs(n, d, experts), np.log(loss))
    grid = {**GRID, **(grid or {})}
    values = [grid[k] if free[i] else (0.0,) for i, k in enumerate(NAMES)]
    with threadpool_limits(1):  # BLAS threads on problems this small cost 10-30x in contention
        theta, objective = _search(_starts(values, data, n_starts), data, free)
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(n_boot):
            rows = rng.integers(0, len(n), len(n))
            sample = tuple(v[rows] for v in data)
            if all(len(np.unique(sample[i])) > 1 for i in range(3 if routed else 2)):
                starts = np.vstack([theta, _starts(values, sample, boot_starts)])
                refit, _ = _search(starts, sample, free)
                if refit is not None:
                    boot.append(refit)
    scatter = float(np.sqrt(np.mean((_log_predict(theta, *data[:3]) - data[3]) ** 2)))
    return LossLaw.of(theta, n_points=len(n), excluded=exclude_highest, objective=objective,
                      scatter=scatter, n_range=(float(n.min()), float(n.max())),
                      d_range=(float(d.min()), float(d.max())),
                      boot=np.asarray(boot).reshape(-1, 6))


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal split of a training budget under a LossLaw."""

    flops: float  # the budget C (FLOPs)
    experts: float
    params: float  # N_opt
    tokens: float  # D_opt = C / (k N_opt)
    loss: float  # L(N_opt, D_opt)
    loss_band: tuple[float, float]  # 95% bootstrap band of the predicted loss at (N_opt, D_opt)
    params_band: tuple[float, float]  # 95% band of each refit's own N_opt


def compute_optimal(law: LossLaw, flops: float, experts: float = 1.0,
                    flops_per_param_token: float = CHINCHILLA_FLOPS_PER_PARAM_TOKEN) -> Allocation:
    """Minimise L(N, D) subject to k N D = C (Hoffmann et al. 2022, eq. 4, closed form):
    N_opt = G (C / k)^(beta / (alpha + beta)) with G = (alpha A' / (beta B))^(1 / (alpha + beta)),
    A' = A Ê^-gamma.

    Args:
      law: a fitted LossLaw (its bootstrap refits give the bands).
      flops: the training budget C in FLOPs, > 0.
      experts: expert count (1: dense).
      flops_per_param_token: k, training FLOPs per parameter and token (6 for C = 6 N D).
    """
    if not (np.isfinite(flops) and flops > 0):
        raise ValueError(f"the budget must be a positive number of FLOPs, got {flops}")
    if not (law.alpha > 0 and law.beta > 0):
        raise ValueError(f"the law has alpha={law.alpha:.3g}, beta={law.beta:.3g}: with a "
                         "non-positive exponent more parameters or tokens never help, so there "
                         "is no compute-optimal split; refit on a ladder that spans more")

    def optimum(l: LossLaw) -> float:
        a_eff = l.A * float(saturating_experts(experts)) ** -l.gamma
        g = (l.alpha * a_eff / (l.beta * l.B)) ** (1 / (l.alpha + l.beta))
        return g * (flops / flops_per_param_token) ** (l.beta / (l.alpha + l.beta))

    params = optimum(law)
    tokens = flops / (flops_per_param_token * params)
    reps = law.replicates()
    at = [r(params, tokens, experts) for r in reps] or [law(params, tokens, experts)]
    own = [optimum(r) for r in reps] or [params]
    return Allocation(float(flops), float(experts), float(params), float(tokens),
                      float(law(params, tokens, experts)),
                      tuple(map(float, np.quantile(at, [0.025, 0.975]))),
                      tuple(map(float, np.quantile(own, [0.025, 0.975]))))
