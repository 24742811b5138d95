"""Which loss-law form fits a study's runs better: Chinchilla's approach 3 with the routed
extension (`analysis.loss_law`), the joint MoE law or the granularity law (`analysis.moe_law`),
each scored by its cross-validated error on held-out study points. `compare_forms` picks, per
axis the runs vary (E at granularity 1, G at one expert count), the form of fewest coefficients
no worse held out than the best.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.loss_law import HUBER_DELTA, fit_loss_law
from analysis.moe_law import GranularityLaw, fit_granularity_law, fit_joint_law

FORMS = ("chinchilla", "joint", "granularity")  # chinchilla: loss_law's law, routed over E
COEFFICIENTS = {"chinchilla": 6, "joint": 9, "granularity": 7}  # compare_forms prefers fewer


def points(table: pd.DataFrame) -> pd.DataFrame:
    """A run table (`analysis.runs.load_runs`, or runs.csv) as fitting points: n
    (`activated_params`), d (`train_tokens`), loss (`val_loss`), experts (`n_experts`, 1 for
    dense) and granularity (1 where the column is missing or NaN). Unfinished runs, upcycled
    runs and runs without a finite loss are left out (the fits refuse a run without a finite N or D)."""
    if "status" in table:
        table = table[table["status"] == "FINISHED"]
    if "param.train.init_from" in table:  # an upcycled run's D leaves out its dense run's tokens
        source = table["param.train.init_from"].astype(str).str.strip()
        table = table[table["param.train.init_from"].isna() | source.isin(["", "None"])]
    g = table["granularity"] if "granularity" in table else pd.Series(1.0, index=table.index)
    out = pd.DataFrame({"n": table["activated_params"].astype(float),
                        "d": table["train_tokens"].astype(float),
                        "loss": table["val_loss"].astype(float),
                        "experts": table["n_experts"].astype(float).clip(lower=1),
                        "granularity": g.astype(float).fillna(1.0)})
    return out[np.isfinite(out["loss"])].reset_index(drop=True)


def fit_form(form: str, pts: pd.DataFrame, routed: bool | None = None, **kw):
    """`form` (of FORMS) fitted to `pts` (`points`), `kw` passed to its fitter; "chinchilla" is
    `routed` (default: when `pts` holds several expert counts). Raises ValueError as the
    fitter does."""
    n, d, loss = pts["n"], pts["d"], pts["loss"]
    if form == "chinchilla":
        routed = pts["experts"].nunique() > 1 if routed is None else routed
        return fit_loss_law(n, d, loss, pts["experts"] if routed else None, **kw)
    if form == "joint":
        return fit_joint_law(n, d, loss, pts["experts"], **kw)
    if form == "granularity":
        return fit_granularity_law(n, d, loss, pts["granularity"],
                                   experts=float(pts["experts"].iloc[0]), **kw)
    raise ValueError(f"no law form {form!r}; forms: {', '.join(FORMS)}")


def folds(pts: pd.DataFrame, k: int = 10, seed: int = 0) -> np.ndarray:
    """[R] the fold of each run: its configurations (N, D, E, G) shuffled by `seed` and dealt
    into min(k, configurations) folds, so the seeds of one configuration are held out together;
    one table gives every form the same folds."""
    keys = pts[["n", "d", "experts", "granularity"]]
    config = keys.groupby(list(keys.columns), sort=True).ngroup().to_numpy()
    order = np.random.default_rng(seed).permutation(config.max() + 1)
    return order[config] % min(k, config.max() + 1)


def _held_out(form: str, pts: pd.DataFrame, fold: np.ndarray, fit: dict) -> np.ndarray:
    """[R] each run's log residual under `form` fitted to the other folds' runs. Raises
    ValueError (naming the fold) when those runs cannot determine it."""
    residual, routed = np.empty(len(pts)), pts["experts"].nunique() > 1  # as on all runs
    for f in np.unique(fold):
        test = fold == f
        try:
            law = fit_form(form, pts[~test], routed, **fit)
        except ValueError as err:
            raise ValueError(f"without fold {f} ({test.sum()} runs): {err}") from None
        held = pts[test]
        x = held["granularity" if isinstance(law, GranularityLaw) else "experts"]
        residual[test] = np.log(law(held["n"], held["d"], x) / held["loss"]).to_numpy()
    return residual


def held_out_error(form: str, pts: pd.DataFrame, k: int = 10, seed: int = 0,
                   n_starts: int = 20, grid: dict | None = None) -> float:
    """Cross-validated RMSE of log loss of `form` (of FORMS) on `pts` (`points`): each fold
    (`folds`) predicted by the form fitted to the other runs, from the `n_starts` grid
    combinations (`grid`: the form's default overridden) of lowest objective on those runs.

    Raises:
      ValueError: the runs left after a fold cannot determine the form (named).
    """
    fit = {"n_boot": 0, "n_starts": n_starts, "grid": grid}
    return float(np.sqrt(np.mean(_held_out(form, pts, folds(pts, k, seed), fit) ** 2)))


@dataclass(frozen=True)
class Comparison:
    """The forms fitted along one axis the runs vary (`compare_forms`)."""

    axis: str  # "experts" or "granularity"
    runs: pd.DataFrame = field(repr=False)  # the axis's `points`
    experts: float  # granularity axis: the expert count of its runs; NaN on the experts axis
    laws: dict  # form -> its fit to all the axis's runs
    held_out: dict  # form -> cross-validated RMSE of log loss
    skipped: dict  # form -> why it could not be fitted or scored
    chosen: str | None  # None: no form could be scored
    reason: str

    def summary(self) -> dict:
        forms = {f: {"held_out_rmse_log_loss": self.held_out[f], "law": self.laws[f].summary()}
                 for f in self.laws}
        forms.update({f: {"skipped": why} for f, why in self.skipped.items()})
        return {"axis": self.axis, "n_runs": len(self.runs),
                "experts": None if np.isnan(self.experts) else self.experts,
                "forms": forms, "chosen": self.chosen, "reason": self.reason}


def _choose(errors: dict[str, np.ndarray], fold: np.ndarray) -> tuple[str, str]:
    """The form of fewest coefficients among those whose held-out error the lowest form's beats
    by at most one standard error of the per-fold difference of mean squared log error (the
    one-standard-error rule; Hastie et al., The Elements of Statistical Learning, 7.10) or by at
    most HUBER_DELTA in RMSE (0.1% of the loss: no plan turns on it, and noiseless runs differ
    by the optimiser's tolerance below it); with the reason."""
    rmse = {f: float(np.sqrt(np.mean(r**2))) for f, r in errors.items()}
    best = min(rmse, key=rmse.get)
    mse = {f: np.array([np.mean(r[fold == i] ** 2) for i in np.unique(fold)])
           for f, r in errors.items()}
    gap = {f: mse[f] - mse[best] for f in errors}
    close = [f for f in errors if rmse[f] - rmse[best] <= HUBER_DELTA
             or gap[f].mean() <= gap[f].std(ddof=1) / np.sqrt(len(gap[f]))]
    chosen = min(close, key=lambda f: (COEFFICIENTS[f], rmse[f]))
    if chosen == best:
        return chosen, f"lowest held-out error ({rmse[best]:.3g})"
    return chosen, (f"fewer coefficients; {best}'s held-out error ({rmse[best]:.3g} vs "
                    f"{rmse[chosen]:.3g}) is not lower by more than one standard error or "
                    f"{HUBER_DELTA:g}")


def compare_forms(pts: pd.DataFrame, *, k: int = 10, seed: int = 0, n_boot: int = 100,
                  n_starts: int = 50, fold_starts: int = 20,
                  grids: dict | None = None) -> list[Comparison]:
    """Fit and cross-validate every form applicable to `pts` (`points`), per axis the runs vary,
    on the same folds for every form of an axis:

    - experts, when the runs at granularity 1 hold several expert counts (dense included):
      "chinchilla" (routed) and "joint" on those runs;
    - granularity, when the runs of an expert count hold several granularities (the count with
      most, then most runs): "chinchilla" and "granularity" on that count's runs.

    Args:
      pts: `points` of a run table.
      k, seed: the folds (`folds`).
      n_boot, n_starts: of each form's fit to all of the axis's runs (its intervals).
      fold_starts: grid starts of each fold's fit (`held_out_error`).
      grids: form -> its grid overrides.

    Returns:
      A Comparison per axis varied (empty: neither). A form the runs, or a fold's remaining
      runs, cannot determine is `skipped` with the reason; nothing is raised for it.
    """
    axes = []
    flat = pts[pts["granularity"] == 1].reset_index(drop=True)
    if flat["experts"].nunique() > 1:
        axes.append(("experts", flat, ("chinchilla", "joint"), float("nan")))
    moe = pts[pts["experts"] > 1]
    spread = moe.groupby("experts").agg(g=("granularity", "nunique"), r=("loss", "size"))
    if len(moe) and spread["g"].max() > 1:
        experts = spread.sort_values(["g", "r"], ascending=False).index[0]
        axes.append(("granularity", moe[moe["experts"] == experts].reset_index(drop=True),
                     ("chinchilla", "granularity"), float(experts)))
    out = []
    for axis, runs, forms, experts in axes:
        fold, laws, errors, skipped = folds(runs, k, seed), {}, {}, {}
        for form in forms:
            grid = (grids or {}).get(form)
            try:
                law = fit_form(form, runs, n_boot=n_boot, seed=seed, n_starts=n_starts, grid=grid)
                errors[form] = _held_out(form, runs, fold,
                                         {"n_boot": 0, "n_starts": fold_starts, "grid": grid})
                laws[form] = law
            except ValueError as err:
                skipped[form] = str(err)
        chosen, reason = _choose(errors, fold) if errors else (None, "no form could be fitted")
        out.append(Comparison(axis, runs, experts, laws, {
            f: float(np.sqrt(np.mean(r**2))) for f, r in errors.items()}, skipped, chosen, reason))
    return out
