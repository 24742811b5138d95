"""Paper-style figures from a run table. Each figure is written as PDF and PNG, with the
plotted data as CSV beside it (and fitted coefficients as JSON where there is a fit).

- `compute_vs_accuracy`: x = activated forward GFLOPs per token (log), panels validation loss,
  NLG average and NLU average; dense and MoE as two series, seeds as error bars, fitted power
  laws with bootstrap bands.
- `expert_count`: x = experts (log2; the dense model at E = 1), same panels, one line per
  activated size.
- `data_efficiency`: a metric against training tokens, dense vs MoE.
- `routing_health`: expert load per MoE layer (heatmap) and dropped-assignment fractions.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.fit import fit_power_law  # noqa: E402

STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "lines.linewidth": 1.4,
    "lines.markersize": 5, "savefig.dpi": 200, "pdf.fonttype": 42,
}
COLORS = {"dense": "#1f77b4", "moe": "#d62728"}
LABELS = {"dense": "Dense", "moe": "MoE (GLaM)"}


def panels(shots: int) -> list[tuple[str, str]]:
    """(metric column, axis label) of the three panels."""
    return [("val_loss", "Validation loss (nats/token)"),
            (f"eval/nlg_avg/{shots}shot", f"NLG average, {shots}-shot (EM, %)"),
            (f"eval/nlu_avg/{shots}shot", f"NLU average, {shots}-shot (accuracy, %)")]


def _save(fig, data: pd.DataFrame, out: Path, name: str, fits: dict | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png", out / f"{name}.csv"]
    fig.savefig(paths[0], bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    data.to_csv(paths[2], index=False)
    if fits:
        paths.append(out / f"{name}_fits.json")
        paths[-1].write_text(json.dumps(fits, indent=1))
    return paths


def _seed_stats(table: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """Mean, std and count of `metric` over seeds, per group of `keys`."""
    stats = table.groupby(keys)[metric].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    return stats


def size_key(table: pd.DataFrame) -> str:
    """Column naming an activated size: `size` (the dense shape) when loaded from MLflow."""
    return "size" if "size" in table else "model"


def _flops_unit(flops: pd.Series) -> tuple[float, str]:
    return (1e9, "GFLOPs") if flops.max() >= 1e8 else (1e6, "MFLOPs")


def compute_vs_accuracy(table: pd.DataFrame, out: Path, shots: int = 0) -> list[Path]:
    scale, unit = _flops_unit(table["forward_flops_per_token"])
    table = table.assign(gflops=table["forward_flops_per_token"] / scale)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.1), constrained_layout=True)
        plotted, fits = [], {}
        for ax, (metric, label) in zip(axes, panels(shots)):
            if metric not in table:
                ax.set_visible(False)
                continue
            for family, group in table.groupby("family"):
                stats = _seed_stats(group, [size_key(table), "gflops"], metric).sort_values("gflops")
                ax.errorbar(stats["gflops"], stats["mean"], yerr=stats["std"], fmt="o",
                            color=COLORS.get(family), label=LABELS.get(family, family), capsize=2)
                plotted.append(stats.assign(family=family, metric=metric))
                try:
                    law = fit_power_law(group["gflops"], group[metric])
                except ValueError:
                    continue
                xs = np.geomspace(stats["gflops"].min(), stats["gflops"].max(), 50)
                lo, hi = law.band(xs)
                ax.plot(xs, law(xs), color=COLORS.get(family), alpha=0.8)
                ax.fill_between(xs, lo, hi, color=COLORS.get(family), alpha=0.15, linewidth=0)
                fits[f"{metric}|{family}"] = law.summary()
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"Activated {unit} per token (forward)")
            ax.set_ylabel(label)
        axes[0].legend(frameon=False)
        fig.suptitle("Compute vs accuracy: dense and MoE against activated compute "
                     "(error bars: seed std)")
    return _save(fig, pd.concat(plotted, ignore_index=True), out, "compute_vs_accuracy", fits)


def expert_count(table: pd.DataFrame, out: Path, shots: int = 0) -> list[Path]:
    # E = 1 is the dense model: same activated compute, one (always chosen) expert.
    table = table.assign(experts=table["n_experts"].where(table["n_experts"] > 0, 1))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.1), constrained_layout=True)
        plotted = []
        for ax, (metric, label) in zip(axes, panels(shots)):
            if metric not in table:
                ax.set_visible(False)
                continue
            for size, group in table.groupby(size_key(table)):
                stats = _seed_stats(group, ["experts"], metric).sort_values("experts")
                scale, unit = _flops_unit(group["forward_flops_per_token"])
                flops = group["forward_flops_per_token"].median() / scale
                ax.errorbar(stats["experts"], stats["mean"], yerr=stats["std"], marker="o",
                            capsize=2, label=f"{size} ({flops:.3g} {unit}/token)")
                plotted.append(stats.assign(size=size, metric=metric))
            ax.set_xscale("log", base=2)
            ticks = sorted(table["experts"].unique())
            ax.set_xticks(ticks, [("1\n(dense)" if t == 1 else str(int(t))) for t in ticks])
            ax.set_xlabel("Experts per MoE layer (E)")
            ax.set_ylabel(label)
        axes[0].legend(frameon=False)
        fig.suptitle("Expert count at fixed activated compute (error bars: seed std)")
    return _save(fig, pd.concat(plotted, ignore_index=True), out, "expert_count")


def data_efficiency(table: pd.DataFrame, histories: pd.DataFrame, out: Path,
                    key: str = "lm_loss", smooth: int = 20) -> list[Path]:
    """`key` against training tokens (from a load_histories table), one line per run."""
    runs = table.set_index("run_id")
    tokens_per_step = (runs["train_tokens"] / runs["param.train.steps"].astype(float))
    data = histories[histories["key"] == key].copy()
    data["tokens"] = data["step"] * data["run_id"].map(tokens_per_step)
    data["family"] = data["run_id"].map(runs["family"])
    data["model"] = data["run_id"].map(runs["model"])
    data["smoothed"] = data.groupby("run_id")["value"].transform(
        lambda v: v.rolling(smooth, min_periods=1).mean())
    stride = max(1, int(data["step"].max()) // 200)  # ~200 points a run: enough for the eye
    data = data[data["step"] % stride == 0]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.5, 3.2), constrained_layout=True)
        seen = set()
        for run_id, group in data.groupby("run_id"):
            family = group["family"].iloc[0]
            ax.plot(group["tokens"], group["smoothed"], color=COLORS.get(family), alpha=0.6,
                    label=None if family in seen else LABELS.get(family, family))
            seen.add(family)
        ax.set_xscale("log")
        ax.set_xlabel("Training tokens")
        ax.set_ylabel(f"{key} (nats/token, {smooth}-step mean)" if "loss" in key else key)
        ax.legend(frameon=False)
        ax.set_title("Data efficiency: dense vs MoE")
    return _save(fig, data, out, "data_efficiency")


def routing_health(loads: dict[str, dict[str, list[float]]], table: pd.DataFrame,
                   out: Path) -> list[Path]:
    """`loads`: run name -> {"layer<i>": per-expert load} (the runs' expert_load.json)."""
    rows = [(run, layer, e, v) for run, layers in loads.items()
            for layer, values in layers.items() for e, v in enumerate(values)]
    data = pd.DataFrame(rows, columns=["run", "layer", "expert", "load"])
    drop_cols = sorted(c for c in table.columns if c.startswith("moe/") and "dropped" in c)
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), constrained_layout=True)
        if len(data):
            grid = data.pivot_table(index=["run", "layer"], columns="expert", values="load")
            image = left.imshow(grid.values, aspect="auto", cmap="viridis")
            left.set_yticks(range(len(grid)), [f"{r} {l}" for r, l in grid.index], fontsize=6)
            left.set_xlabel("Expert")
            fig.colorbar(image, ax=left, label="Load (x fair share)")
        left.set_title("Expert load per MoE layer (validation split)")
        moe = table[table["family"] == "moe"]
        if drop_cols and len(moe):
            drops = moe.set_index("run_name")[drop_cols] * 100
            drops.plot.bar(ax=right, rot=60, legend=True)
            right.legend([c.replace("moe/", "") for c in drop_cols], frameon=False, fontsize=6)
        right.set_ylabel("Dropped assignments (%)")
        right.set_title("Capacity overflow at the end of training")
    return _save(fig, data, out, "routing_health")
