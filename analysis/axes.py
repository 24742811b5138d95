"""The MoE design axes beyond GLaM in a run table: granularity (Krajewski et al. 2024), shared
experts (DeepSeekMoE), load balancing by a selection bias (DeepSeek-V3) and sparse upcycling
(Komatsuzaki et al. 2022). `with_axes` adds one column per axis, `varied` names those a study
varies (study points differ along them, so analyses never pool them), `verdicts` compares each
setting with GLaM's at the same point, and `figure` draws each varied axis's metrics.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# axis column: (run-table source column, GLaM's setting, how the figure names it)
AXES = {
    "granularity": ("param.model.granularity", 1, "granularity G (experts G x narrower)"),
    "shared_experts": ("param.model.shared_experts", 0, "shared experts"),
    "balance": ("param.model.router.balance", "aux", "load balancing"),
    "upcycled": ("param.train.init_from", False, "started from a dense run"),
}
# Study-point columns an axis changes by design: an upcycled run trains fewer tokens than its
# from-scratch twin at the same total FLOPs (the dense run spent the rest); bias balancing
# resolves the aux loss weight to 0.
MOVES = {"upcycled": ("train_tokens",), "balance": ("param.model.router.aux_loss_weight",)}
BITS, BITS_PER_PARAM = "knowledge/bits", "knowledge/bits_per_param"
PANELS = (("val_loss", "validation loss (nats/token)"), (BITS, "knowledge (bits)"),
          (BITS_PER_PARAM, "knowledge per parameter (bits)"))


def with_axes(table: pd.DataFrame) -> pd.DataFrame:
    """`table` (a `load_runs` table or an exported one) with a column per axis of `AXES`, GLaM's
    setting where a run predates the axis, and `knowledge/bits_per_param` (bits over total
    parameters, embeddings included) where knowledge was measured."""
    out = table.copy()
    for axis, (source, glam, _) in AXES.items():
        values = out[source] if source in out else pd.Series([None] * len(out), index=out.index)
        if axis == "upcycled":
            out[axis] = values.notna() & ~values.astype(str).str.strip().isin(["", "None"])
        elif isinstance(glam, int):
            out[axis] = pd.to_numeric(values, errors="coerce").fillna(glam).astype(int)
        else:
            out[axis] = values.fillna(glam).astype(str)
    if BITS in out and "total_params" in out:
        out[BITS_PER_PARAM] = out[BITS] / out["total_params"]
    return out


def varied(table: pd.DataFrame) -> list[str]:
    """The axes of `AXES` (columns of a `with_axes` table) whose MoE runs take several values."""
    moe = table[table["family"] == "moe"] if "family" in table else table
    return [a for a in AXES if a in moe and moe[a].nunique() > 1]


def _gain(base: pd.Series, other: pd.Series, metric: str) -> tuple[float, float]:
    """How much better `other` is than `base` (lower is better for a loss) and the spread: the
    two seed standard deviations in quadrature (0 with one seed each)."""
    base, other = base.dropna(), other.dropna()
    sd = [s.std(ddof=1) if len(s) > 1 else 0.0 for s in (base, other)]
    return float((-1 if "loss" in metric else 1) * (other.mean() - base.mean())), float(np.hypot(*sd))


def _verdict(gap: float, spread: float) -> str:
    if spread == 0:
        return "one seed: no spread to judge by"
    if abs(gap) <= 2 * spread:
        return "within 2x the spread"
    return "ahead beyond 2x the spread" if gap > 0 else "behind beyond 2x the spread"


def verdicts(table: pd.DataFrame, metrics: tuple[str, ...], keys: list[str]) -> list[str]:
    """For each varied axis, every setting against GLaM's at the same point (`keys`, the other
    axes included): the mean gain on each metric, its spread and the verdict.

    Args:
      table: a `with_axes` table.
      metrics: metric columns (a loss: lower is better; others higher).
      keys: the columns that tell study points apart (`analysis.figures.point_keys`).
    """
    lines = []
    moe = table[table["family"] == "moe"]
    for axis in varied(table):
        glam = AXES[axis][1]
        others = [k for k in keys if k != axis and k not in MOVES.get(axis, ())]
        for point, group in moe.groupby(others) if others else [((), moe)]:
            label = ", ".join(map(str, point if isinstance(point, tuple) else (point,)))
            base = group[group[axis] == glam]
            for value, runs in group[group[axis] != glam].groupby(axis):
                for metric in (m for m in metrics if m in group and group[m].notna().any()):
                    if base[metric].isna().all():
                        continue
                    gap, spread = _gain(base[metric], runs[metric], metric)
                    lines.append(f"{label}: {axis}={value} vs {glam}, {metric} gain {gap:+.4g} "
                                 f"(spread {spread:.3g}, seeds {len(base)}/{len(runs)}): "
                                 f"{_verdict(gap, spread)}")
    return lines


def figure(table: pd.DataFrame, out: Path, keys: list[str]) -> list[Path]:
    """One figure per varied axis (`axis_<name>.png/.pdf` and its `.csv`): validation loss,
    knowledge and knowledge per parameter against the axis's settings, seed mean +- standard
    deviation, one line per point (`keys` besides the axis)."""
    written = []
    moe = table[table["family"] == "moe"]
    panels = [(m, label) for m, label in PANELS if m in moe and moe[m].notna().any()]
    for axis in varied(table):
        others = [k for k in keys if k != axis and k not in MOVES.get(axis, ())]
        stats = (moe.groupby([*others, axis])[[m for m, _ in panels]]
                 .agg(["mean", "std", "count"]))
        out.mkdir(parents=True, exist_ok=True)
        stats.to_csv(out / f"axis_{axis}.csv")
        fig, axs = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, (metric, label) in zip(axs[0], panels):
            for point, rows in (stats.groupby(level=list(range(len(others)))) if others
                                else [("all", stats)]):
                x = [str(v) for v in rows.index.get_level_values(axis)]
                name = ", ".join(map(str, point)) if isinstance(point, tuple) else str(point)
                ax.errorbar(x, rows[(metric, "mean")], yerr=rows[(metric, "std")].fillna(0),
                            marker="o", capsize=3, label=name)
            ax.set_xlabel(AXES[axis][2])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        if others:
            axs[0][0].legend(fontsize=7, title=", ".join(others), title_fontsize=7)
        fig.suptitle(f"MoE runs by {AXES[axis][2]} (mean +- seed std)", fontsize=9)
        fig.tight_layout()
        for suffix in ("png", "pdf"):
            fig.savefig(out / f"axis_{axis}.{suffix}", dpi=150)
            written.append(out / f"axis_{axis}.{suffix}")
        plt.close(fig)
        written.append(out / f"axis_{axis}.csv")
    return written
