"""Loss laws over the expert count E and the granularity G, fitted as `analysis.loss_law` fits
Chinchilla's, and a cross-validated comparison of every form the runs can determine.

Joint law (Ludziejewski et al. 2025, "Joint MoE Scaling Laws", arXiv 2502.05172):

    L(N, D, E) = a Ê^delta N^-(alpha + gamma ln Ê) + b Ê^omega D^-(beta + zeta ln Ê) + c

N: activated parameters (`activated_params`); D: training tokens (`train_tokens`); E:
`n_experts` at granularity 1 (1: dense). Ê, the paper's transformed expert count, follows
Clark et al.'s saturating transform (2022, eq. 9), here at `analysis.fit.saturating_experts`'
defaults (no saturation within reach; the routed extension's Ê, so the forms compare on one
Ê): Ê(1) = 1, and a dense model follows Chinchilla's law. The paper writes N^(alpha + gamma ln Ê) and D^(beta + zeta ln Ê) with
negative fitted exponents; here the minus sign is written out, so loss falls with N and D for
alpha, beta > 0: alpha, beta, gamma, zeta are the paper's negated; delta, omega are its own.

Granularity law (Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts",
arXiv 2402.07871), at one expert count (the paper's expansion rate, 64 there):

    L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta

N: the paper's model size, the parameters a token activates at its fixed expansion rate;
here `activated_params`.
G: `granularity` (a missing column or NaN is 1).

Each law is log L = log-sum-exp of terms linear in its coefficients (a, b, c, g as logs),
fitted by approach 3 (Hoffmann et al. 2022; Besiroglu et al. 2024) as `fit_loss_law` does:
the summed Huber loss (delta 1e-3) of the log residuals, minimised by L-BFGS-B on centred
log N and log D from the grid combinations of lowest objective, bootstrap refits each searching
its own resample. Which form fits a study's runs better is `analysis.law_choice`'s question.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from analysis.fit import saturating_experts
from analysis.loss_law import (EXPONENT_BOUNDS, EXPONENT_FLOOR, EXPONENT_SPAN, GRID,
                               HUBER_DELTA, LossLaw, huber)


@dataclass(frozen=True)
class _Form:
    """A law as log L = LSE_t(X_t @ theta): `design(log N, log D, log x)` gives X ([T, R, P])."""

    names: tuple[str, ...]  # theta's order
    logged: tuple[str, ...]  # coefficients held as their logs
    bounds: dict  # name -> (low, high); the rest free
    grid: dict  # name -> starting values
    design: Callable
    transform: Callable  # x -> log of the variable the law takes (log Ê, log G)
    axis: str  # the runs' variable, for refusals


def _joint_design(logn, logd, loge):
    one, zero = np.ones_like(logn), np.zeros_like(logn)
    return np.stack([
        np.stack([one, zero, zero, -logn, zero, -loge * logn, loge, zero, zero], -1),
        np.stack([zero, one, zero, zero, -logd, zero, zero, -loge * logd, loge], -1),
        np.stack([zero, zero, one, zero, zero, zero, zero, zero, zero], -1)])


def _granularity_design(logn, logd, logg):
    one, zero = np.ones_like(logn), np.zeros_like(logn)
    return np.stack([np.stack([one, zero, zero, zero, -logn, zero, zero], -1),
                     np.stack([zero, zero, zero, one, -logn, zero, -logg], -1),
                     np.stack([zero, one, zero, zero, zero, -logd, zero], -1),
                     np.stack([zero, zero, one, zero, zero, zero, zero], -1)])


_CHINCHILLA_GRID = {"a": GRID["a"], "b": GRID["b"], "c": GRID["e"], "alpha": GRID["alpha"],
                    "beta": GRID["beta"]}
JOINT = _Form(
    names=("a", "b", "c", "alpha", "beta", "gamma", "delta", "zeta", "omega"),
    logged=("a", "b", "c"),
    # ln Ê reaches ~7 at 1,000 experts: |gamma|, |zeta| < 0.1 keep the exponents' shift < 0.7
    bounds={"alpha": EXPONENT_BOUNDS, "beta": EXPONENT_BOUNDS, "gamma": (-0.1, 0.1),
            "zeta": (-0.1, 0.1)},
    # Ê's coefficients start at 0 (the dense law): each enters a log term linearly, so
    # L-BFGS-B moves them from there as surely as from a grid, at a ninth of its cost
    grid={**_CHINCHILLA_GRID, "gamma": (0.0,), "delta": (0.0,), "zeta": (0.0,), "omega": (0.0,)},
    design=_joint_design, transform=lambda e: np.log(saturating_experts(e)),
    axis="expert counts (E)")
GRANULARITY = _Form(
    names=("a", "b", "c", "g", "alpha", "beta", "gamma"), logged=("a", "b", "c", "g"),
    bounds={"alpha": EXPONENT_BOUNDS, "beta": EXPONENT_BOUNDS, "gamma": EXPONENT_BOUNDS},
    grid={**_CHINCHILLA_GRID, "g": (0.0, 5.0, 10.0), "gamma": (0.0, 0.5, 1.0)},
    design=_granularity_design, transform=np.log, axis="granularities (G)")


def _objective(theta, x, logl):
    """Summed Huber loss of the log residuals in units of HUBER_DELTA^2 (L-BFGS-B's stopping
    rule needs an objective of order 1, see `analysis.loss_law`), and its gradient ([P])."""
    terms = x @ theta
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - logl
    w = weights / total * (np.clip(r / HUBER_DELTA, -1, 1) / HUBER_DELTA)
    return huber(r)[0].sum() / HUBER_DELTA**2, np.einsum("tr,trp->p", w, x)


def _centring(form: _Form, shift) -> np.ndarray:
    """[P, P] the map from coefficients on (log N, log D) to those on them less `shift`: the
    same law, its intercepts no longer moving with the exponents (L-BFGS-B needs half the
    iterations). Solved on probe points, exactly: each form is closed under the shift, which
    moves intercepts only, so the exponents' bounds hold either way."""
    probe = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=3))).T
    rows = lambda logn, logd, logx: form.design(logn, logd, logx).reshape(-1, len(form.names))
    return np.linalg.lstsq(rows(probe[0], probe[1], probe[2]),
                           rows(probe[0] + shift[0], probe[1] + shift[1], probe[2]),
                           rcond=None)[0]


def _minimise(form: _Form, start, logs, logl):
    """L-BFGS-B from `start` ([P]) within the form's bounds: the end point ([P]) and its summed
    Huber loss."""
    shift = (logs[0].mean(), logs[1].mean())
    t = _centring(form, shift)
    x = form.design(logs[0] - shift[0], logs[1] - shift[1], logs[2])
    result = minimize(_objective, t @ start, args=(x, logl), jac=True, method="L-BFGS-B",
                      bounds=[form.bounds.get(k, (None, None)) for k in form.names])
    return np.linalg.solve(t, result.x), float(result.fun) * HUBER_DELTA**2


def _lse(terms):
    """log-sum-exp over the first axis (5x scipy's speed on grids of starts)."""
    top = terms.max(axis=0)
    return top + np.log(np.exp(terms - top).sum(axis=0))


def _starts(form: _Form, combos, logs, logl, n_starts: int) -> np.ndarray:
    """The `n_starts` rows of `combos` ([S, P], the grid's) of lowest objective."""
    x = form.design(*logs)
    rows = x.reshape(-1, x.shape[-1])  # [T R, P]: one matrix product per chunk
    objective = np.concatenate([
        huber(_lse((rows @ chunk.T).reshape(*x.shape[:2], -1)) - logl[:, None])[0].sum(0)
        for chunk in np.array_split(combos, max(1, len(combos) // 4096))])
    return combos[np.argsort(objective, kind="stable")[:n_starts]]


def _search(form, starts, logs, logl):
    best, best_loss = None, np.inf
    for start in starts:
        theta, loss = _minimise(form, start, logs, logl)
        if np.isfinite(loss) and np.all(np.isfinite(theta)) and loss < best_loss:
            best, best_loss = theta, loss
    return best, best_loss


def _fit(cls, n, d, loss, x, *, n_boot: int = 100, seed: int = 0, grid: dict | None = None,
         n_starts: int = 50, boot_starts: int = 4, **fields):
    """`cls` (a law) fitted to the runs by `fit_loss_law`'s procedure; `fields` go to the law.
    Refuses (ValueError) runs that cannot determine its coefficients."""
    form = cls.FORM
    n, d, loss, x = (np.asarray(v, float).ravel() for v in (n, d, loss, x))
    if not len(n) == len(d) == len(loss) == len(x):
        raise ValueError(f"n, d, loss and {form.axis} differ in length: {len(n)}, {len(d)}, "
                         f"{len(loss)}, {len(x)}")
    for name, values in (("n (parameters)", n), ("d (tokens)", d), ("loss", loss),
                         (form.axis, x)):
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if len(bad):
            raise ValueError(f"{name} must be finite and positive; runs {bad[:5].tolist()} "
                             f"have {values[bad[:5]].tolist()}")
    for name, values in (("parameter counts (N)", n), ("token counts (D)", d), (form.axis, x)):
        if len(np.unique(values)) < 2:
            raise ValueError(f"the runs have one value of {name}: the law cannot separate its "
                             "term; add runs that vary it")
    if len(n) <= len(form.names):
        raise ValueError(f"{len(n)} runs for {len(form.names)} coefficients: add runs")
    logs, logl = (np.log(n), np.log(d), form.transform(x)), np.log(loss)
    grid = {**form.grid, **(grid or {})}
    combos = np.array(list(itertools.product(*(grid[k] for k in form.names))))
    with threadpool_limits(1):  # BLAS threads on problems this small cost more than they give
        theta, objective = _search(form, _starts(form, combos, logs, logl, n_starts), logs, logl)
        if theta is None:
            raise ValueError("no start converged: check the runs' losses")
        rng, boot = np.random.default_rng(seed), []
        for _ in range(n_boot):
            rows = rng.integers(0, len(n), len(n))
            sample = tuple(v[rows] for v in logs)
            if all(len(np.unique(v)) > 1 for v in sample):
                starts = np.vstack([theta, _starts(form, combos, sample, logl[rows],
                                                   boot_starts)])
                refit, _ = _search(form, starts, sample, logl[rows])
                if refit is not None:
                    boot.append(refit)
    r = _lse(form.design(*logs) @ theta) - logl
    return cls.of(theta, n_points=len(n), objective=objective,
                  scatter=float(np.sqrt(np.mean(r**2))), n_range=(float(n.min()), float(n.max())),
                  d_range=(float(d.min()), float(d.max())),
                  boot=np.asarray(boot).reshape(-1, len(theta)), **fields)


@dataclass(frozen=True, kw_only=True)
class _Law:
    """What the fitted laws share: the fit's statistics and its bootstrap refits ([n_boot, P],
    theta's order, logged coefficients as logs)."""

    FORM: ClassVar[_Form]
    n_points: int = 0
    objective: float = float("nan")  # summed Huber loss at the optimum
    scatter: float = float("nan")  # RMS of the fitted runs' log residuals
    n_range: tuple[float, float] = (float("nan"), float("nan"))  # the runs' smallest, largest N
    d_range: tuple[float, float] = (float("nan"), float("nan"))  # ... and D
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    @property
    def theta(self) -> np.ndarray:
        return np.array([np.log(getattr(self, k)) if k in self.FORM.logged else getattr(self, k)
                         for k in self.FORM.names])

    @classmethod
    def of(cls, theta, **kw):
        return cls(**{k: float(np.exp(v) if k in cls.FORM.logged else v)
                      for k, v in zip(cls.FORM.names, theta)}, **kw)

    def __call__(self, n, d, x):
        """Predicted loss (nats/token) at activated parameters `n`, tokens `d` and the form's
        variable `x` (experts or granularity; broadcast, float64)."""
        n, d, x = np.broadcast_arrays(*(np.asarray(v, float) for v in (n, d, x)))
        return np.exp(_lse(self.FORM.design(np.log(n), np.log(d), self.FORM.transform(x))
                           @ self.theta))

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Bootstrap quantile interval of each coefficient (empty without bootstrap refits)."""
        if not len(self.boot):
            return {}
        q = np.quantile(self.boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return {k: tuple(float(np.exp(v) if k in self.FORM.logged else v) for v in q[:, i])
                for i, k in enumerate(self.FORM.names)}

    def undetermined(self, level: float = 0.95) -> dict[str, str]:
        """Coefficients the runs leave open, each with the reason (empty: none): a bounded one
        at its bound (within EXPONENT_FLOOR); alpha or beta with a bootstrap interval reaching
        below EXPONENT_FLOOR or spanning more than a factor EXPONENT_SPAN."""
        out, iv = {}, self.intervals(level)
        for name, (lo, hi) in self.FORM.bounds.items():
            value = getattr(self, name)
            if not lo + EXPONENT_FLOOR < value < hi - EXPONENT_FLOOR:
                out[name] = f"{name} = {value:.3g} is at a bound of [{lo:g}, {hi:g}]"
        for name in ("alpha", "beta"):
            low, high = iv.get(name, (getattr(self, name),) * 2)
            if name not in out and (low < EXPONENT_FLOOR or high > EXPONENT_SPAN * low):
                out[name] = (f"its {level:.0%} interval [{low:.3g}, {high:.3g}] spans more than "
                             f"a factor {EXPONENT_SPAN:g}")
        return out

    def summary(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "boot"},
                "n_boot": len(self.boot), "intervals_95": self.intervals(),
                "undetermined": self.undetermined()}

    def _at(self, columns: Callable) -> LossLaw:
        """The Chinchilla law this law is at one value of its variable: `columns(theta)` gives
        (log A, log B, log E, alpha, beta) for theta of shape [P] or [P, n_boot]."""
        refits = self.boot.reshape(-1, len(self.FORM.names)).T
        boot = np.column_stack([*columns(refits), np.zeros(refits.shape[1])])
        return LossLaw.of([*columns(self.theta), 0.0], n_points=self.n_points,
                          scatter=self.scatter, n_range=self.n_range, d_range=self.d_range,
                          boot=boot.reshape(-1, 6))


@dataclass(frozen=True)
class JointLaw(_Law):
    """Ludziejewski et al.'s joint law (module docstring): L(N, D, E) with N activated
    parameters, D tokens, E experts (1: dense)."""

    FORM: ClassVar[_Form] = JOINT
    a: float
    b: float
    c: float
    alpha: float
    beta: float
    gamma: float
    delta: float
    zeta: float
    omega: float

    def at(self, experts: float) -> LossLaw:
        """The law at `experts` (1: dense) as a LossLaw in N and D, bootstrap refits included:
        A = a Ê^delta, alpha + gamma ln Ê, B = b Ê^omega, beta + zeta ln Ê."""
        le = float(self.FORM.transform(experts))
        return self._at(lambda t: (t[0] + t[6] * le, t[1] + t[8] * le, t[2], t[3] + t[5] * le,
                                   t[4] + t[7] * le))


@dataclass(frozen=True)
class GranularityLaw(_Law):
    """Krajewski et al.'s granularity law (module docstring): L(N, D, G) with N activated
    parameters, D tokens, G granularity, at one expert count `experts`."""

    FORM: ClassVar[_Form] = GRANULARITY
    a: float
    b: float
    c: float
    g: float
    alpha: float
    beta: float
    gamma: float
    experts: float = float("nan")  # the expert count (granularity 1) the runs share

    def at(self, granularity: float) -> LossLaw:
        """The law at `granularity` as a LossLaw in N and D: A = a + g / G^gamma."""
        lg = float(np.log(granularity))
        return self._at(lambda t: (np.logaddexp(t[0], t[3] - t[6] * lg), t[1], t[2], t[4], t[5]))


def fit_joint_law(n, d, loss, experts, **kw) -> JointLaw:
    """Fit the joint law (Ludziejewski et al. 2025) to runs by approach 3.

    Args:
      n, d, loss: [R] activated parameters, training tokens and final loss (nats/token), > 0.
      experts: [R] expert counts at granularity 1 (1: dense).
      kw: n_boot (100), seed (0), grid (`JOINT`'s, overridden per coefficient), n_starts (50),
        boot_starts (4), as `analysis.loss_law.fit_loss_law`.

    Raises:
      ValueError: differing lengths, non-positive values, one value of N, D or E (named), or
        no more runs than the law's 9 coefficients.
    """
    return _fit(JointLaw, n, d, loss, experts, **kw)


def fit_granularity_law(n, d, loss, granularity, experts: float = float("nan"),
                        **kw) -> GranularityLaw:
    """Fit the granularity law (Krajewski et al. 2024) to runs at one expert count `experts`
    (recorded on the law): as `fit_joint_law`, with [R] `granularity` (G >= 1), `GRANULARITY`'s
    grid and 7 coefficients; one value of G is refused naming granularities (G)."""
    return _fit(GranularityLaw, n, d, loss, granularity, experts=float(experts), **kw)
