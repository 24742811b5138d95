"""Knowledge capacity (Allen-Zhu & Li, "Physics of Language Models 3.3", ICLR 2025): bits of the
world's facts a model stores against its total parameters, beside the reference's 1 and 2 bits
per parameter; and the study's verdicts on knowledge, with the seed spread beside each gap.

`knowledge_capacity.{pdf,png,csv}`: log-log, dense and each expert count as series, seed means
with seed-std error bars (bits from the runs' `knowledge/bits`, glam.eval.knowledge).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.figures import (STYLE, _legend_below, _log_x, _save, _series_colors, at_longest,
                              point_keys, series, series_order, size_key)
from glam.accounting import short_count

BITS = "knowledge/bits"
REFERENCE = ((1.0, "1 bit/param (~100 exposures)"), (2.0, "2 bits/param (~1,000 exposures)"))


def _spread_note(counts: pd.Series) -> str:
    return "error bars: seed std" if counts.min() >= 2 else "one seed: no error bars"


def knowledge_capacity(table: pd.DataFrame, out: Path) -> list[Path]:
    """Bits stored against total parameters (embeddings included), per series and size.

    Raises:
      ValueError: no run logged `knowledge/bits`.
    """
    if BITS not in table or table[BITS].isna().all():
        raise ValueError(f"no run logged {BITS} (a world corpus with eval.knowledge_facts > 0)")
    table, longest = at_longest(table.dropna(subset=[BITS]))
    table = table.assign(series=series(table))
    stats = (table.groupby(["series", size_key(table)])
             .agg(total_params=("total_params", "mean"), bits_mean=(BITS, "mean"),
                  bits_std=(BITS, "std"), seeds=(BITS, "count")).reset_index())
    stats["bits_std"] = stats["bits_std"].fillna(0.0)
    stats["bits_per_param"] = stats["bits_mean"] / stats["total_params"]
    world = table["param.corpus.knowledge_bits"].astype(float).max() if \
        "param.corpus.knowledge_bits" in table else None
    colors = _series_colors(stats["series"])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.6, 3.6), layout="constrained")
        for name, group in sorted(stats.groupby("series"), key=lambda g: series_order(g[0])):
            group = group.sort_values("total_params")
            ax.errorbar(group["total_params"], group["bits_mean"], yerr=group["bits_std"],
                        marker="o", capsize=2, color=colors[name], label=name)
        xs = np.geomspace(stats["total_params"].min() / 1.3, stats["total_params"].max() * 1.3)
        for (per_param, label), dash in zip(REFERENCE, ((4, 2), (1, 1.5))):
            ax.plot(xs, per_param * xs, color="0.4", linewidth=1, dashes=dash, label=label)
        if world:
            ax.axhline(world, color="0.2", linewidth=0.8,
                       label=f"the world's knowledge ({short_count(world)} bits)")
        _log_x(ax, stats["total_params"], label=short_count)
        ax.set_yscale("log")
        low = max(stats["bits_mean"].min() / 2, 1.0)
        ax.set_ylim(low, max(2 * xs.max(), world or 0) * 1.5)
        ax.set_xlabel("Total parameters (embeddings included)")
        ax.set_ylabel("Knowledge stored (bits)")
        _legend_below(fig, [ax], ncol=2)
        fig.suptitle("Knowledge capacity (" + _spread_note(stats["seeds"]) + ")"
                     + (f"\n{longest}" if longest else ""))
    return _save(fig, stats, out, "knowledge_capacity")


def _gain(a: pd.Series, b: pd.Series, metric: str) -> tuple[float, float]:
    """How much better b is than a on `metric` (mean difference; lower is better for a loss),
    and the spread of that difference (the two seed stds in quadrature; 0 with one seed each)."""
    a, b = a.dropna(), b.dropna()
    sd = [s.std(ddof=1) if len(s) > 1 else 0.0 for s in (a, b)]
    sign = -1.0 if "loss" in metric else 1.0
    return float(sign * (b.mean() - a.mean())), float(np.hypot(*sd))


def _verdict(gap: float, spread: float) -> str:
    if spread == 0:
        return "one seed: no spread to judge by"
    if gap > 2 * spread:
        return "MoE ahead beyond 2x the spread"
    return "behind beyond 2x the spread" if gap < -2 * spread else "within 2x the spread"


def verdicts(table: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """Lines of the study's findings on `metrics` (those in the table): per point, each expert
    count against the dense twin (gain, its spread, the verdict); with several expert counts,
    whether each metric improves with E step by step (no step worse than its spread) and
    which E is best."""
    metrics = tuple(m for m in metrics if m in table and table[m].notna().any())
    if not metrics or "n_experts" not in table:
        return []
    table, _ = at_longest(table)
    keys = point_keys(table) + (["arm"] if "arm" in table else [])
    lines = []
    for point, group in table.groupby(keys):
        label = ", ".join(map(str, point if isinstance(point, tuple) else (point,)))
        by_e = {int(e): g for e, g in group.groupby(group["n_experts"].fillna(0))}
        if 0 not in by_e or len(by_e) < 2:
            continue
        for metric in metrics:
            for e in sorted(by_e)[1:]:
                if by_e[0][metric].isna().all() or by_e[e][metric].isna().all():
                    continue
                gap, spread = _gain(by_e[0][metric], by_e[e][metric], metric)
                lines.append(f"{label}: E={e} vs dense, {metric} gain {gap:+.4g} "
                             f"(spread {spread:.3g}): {_verdict(gap, spread)}")
            measured = {e: g for e, g in by_e.items() if g[metric].notna().any()}
            if len(measured) > 2:
                lines.append(f"{label}: {metric} by E: " + _rise(measured, metric))
    return lines


def _rise(by_e: dict[int, pd.DataFrame], metric: str) -> str:
    """Whether every step up in E is no worse than its spread, or where one is; the best E."""
    es = sorted(by_e)
    means = {e: by_e[e][metric].mean() for e in es}  # pandas skips NaN
    falls = []
    for lo, hi in zip(es, es[1:]):
        gap, spread = _gain(by_e[lo][metric], by_e[hi][metric], metric)
        if gap < -spread:
            falls.append(f"{lo}->{hi} worse by {-gap:.4g} (spread {spread:.3g})")
    peak = (min if "loss" in metric else max)(es, key=lambda e: means[e])
    trail = ", ".join(f"E={'1 (dense)' if e == 0 else e}: {means[e]:.4g}" for e in es)
    head = (f"every step no worse than its spread, best at E={peak}" if not falls
            else "falls beyond the spread at " + "; ".join(falls) + f"; best at E={peak}")
    return f"{head} [{trail}]"


def knowledge_history(table: pd.DataFrame, histories: pd.DataFrame, out: Path) -> Path:
    """`knowledge_history.csv`: knowledge bits at every evaluation (a `load_histories` table of
    `knowledge/bits`), mean, std and seed count per size, series and step: whether a model's
    knowledge still rises at the end of its run or has reached a plateau."""
    runs = table.assign(series=series(table)).set_index("run_id")
    data = histories[histories["key"] == BITS].copy()
    for column in (size_key(table), "series"):
        data[column] = data["run_id"].map(runs[column])
    stats = (data.groupby([size_key(table), "series", "step"])["value"]
             .agg(["mean", "std", "count"]).reset_index())
    out.mkdir(parents=True, exist_ok=True)
    path = out / "knowledge_history.csv"
    stats.to_csv(path, index=False)
    return path
