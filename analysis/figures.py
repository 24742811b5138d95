"""Paper-style figures from a run table. Each figure is written as PDF and 300 dpi PNG, with
the plotted data as CSV beside it (and fitted coefficients as JSON where there is a fit), in one
style: Okabe-Ito colours (safe for colour-blind readers), 8-9 pt text, legends under the panels.

- `compute_vs_accuracy`: x = activated forward FLOPs per token (log), panels validation loss,
  NLG average, NLU average and knowledge stored (bits; world runs); dense and each expert count
  as its own series, seed means with seed-std error bars, fitted power laws with bootstrap
  bands only where they pass through 4+ points within the seed spread.
- `expert_count`: x = experts (log2; the dense model at E = 1), same panels, one line per
  activated size (labelled by its activated parameters).
- `data_efficiency`: training loss against training tokens and against training FLOPs, one line
  per size and series.
- `routing_health`: expert load per MoE layer (heatmap) and dropped-assignment fractions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.axes import AXES  # noqa: E402
from analysis.fit import honest_fit  # noqa: E402
from glam.accounting import short_count  # noqa: E402

# One style for every figure: 8-9 pt text stays readable when a 7-inch-wide figure is set at a
# paper's full width (and a 3.4-inch one in a column), 300 dpi PNG beside the vector PDF.
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "lines.linewidth": 1.4,
    "lines.markersize": 5, "savefig.dpi": 300, "pdf.fonttype": 42,
}
# Okabe and Ito's colour-blind-safe palette: dense in blue, then one colour per series.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
             "#F0E442")
COLORS = {"dense": OKABE_ITO[0], "moe": OKABE_ITO[1]}
LABELS = {"dense": "Dense", "moe": "MoE"}
WIDE = (7.0, 2.9)  # three panels at a paper's full text width (inches)
TUNED = ("param.schedule.", "param.optimizer.", "param.model.router.")  # what searches vary
PLACEMENTS = {"matched": "expert widths FLOP-matched to the dense model",
              "glam": "GLaM placement, experts as wide as the dense FFN"}


def panels(shots: int, table: pd.DataFrame) -> list[tuple[str, str]]:
    """(metric column, axis label) of the panels the table has a value for: validation loss,
    NLG and NLU averages, and knowledge stored (runs on a world)."""
    every = [("val_loss", "Validation loss (nats/token)"),
             (f"eval/nlg_avg/{shots}shot", f"NLG avg., {shots}-shot (EM %)"),
             (f"eval/nlu_avg/{shots}shot", f"NLU avg., {shots}-shot (acc. %)"),
             ("knowledge/bits", "Knowledge stored (bits)")]
    return [(m, label) for m, label in every if m in table and table[m].notna().any()]


def _panel_grid(n: int):
    """A figure of `n` panels: one row of up to 3 at full text width, else rows of 2."""
    cols = n if n <= 3 else 2
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDE[0], WIDE[1] * rows + 0.3 * (rows - 1)),
                             layout="constrained", squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def spread_title(stats: pd.DataFrame) -> str:
    """'(error bars: seed std)' when every point has at least 2 seeds; else what there is."""
    counts = stats.loc[stats["count"] > 0, "count"]  # points with a value
    if len(counts) and counts.min() >= 2:
        return "(error bars: seed std)"
    return "(one seed per point: no error bars)" if not len(counts) or counts.max() < 2 else \
        "(error bars: seed std where a point has 2+ seeds)"


def _save(fig, data: pd.DataFrame, out: Path, name: str, fits: dict | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png", out / f"{name}.csv"]
    fig.savefig(paths[0], bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", dpi=STYLE["savefig.dpi"])  # after the rc context
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


def point_keys(table: pd.DataFrame) -> list[str]:
    """The columns that tell one study point from another besides its series and seed: the
    activated size, the training tokens when the runs differ in them (a ladder), the MoE design
    axes a study varies (`analysis.axes`), and the schedule, optimizer and router settings that
    differ (a search's trials). Seeds of one point
    are pooled; different points never are."""
    keys = [size_key(table)]
    if "train_tokens" in table and table["train_tokens"].nunique() > 1:
        keys.append("train_tokens")
    design = [a for a in AXES if a in table and table[a].nunique() > 1]  # `with_axes` columns
    sources = {source for source, _, _ in AXES.values()}
    return keys + design + [c for c in table.columns  # a search's trials
                            if c.startswith(TUNED) and c not in sources
                            and table[c].nunique(dropna=True) > 1]


def at_longest(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs of the largest training-token count when the runs differ in it (per-token
    compute and expert-count curves compare models trained alike), with a note saying so."""
    if "train_tokens" not in table or table["train_tokens"].nunique() < 2:
        return table, ""
    most = table["train_tokens"].max()
    return table[table["train_tokens"] == most], f"at {short_count(most)} training tokens"


def size_label(activated_params: float) -> str:
    """A size as a reader knows it: its activated parameters."""
    return f"{short_count(activated_params)} activated params"


def _flops_unit(flops: pd.Series) -> tuple[float, str]:
    return (1e9, "GFLOPs") if flops.max() >= 1e8 else (1e6, "MFLOPs")


def _log_x(ax, values, base: float = 10, label=lambda x: f"{x:.3g}") -> None:
    """A log x axis whose data are labelled (by `label`): at most 8 distinct x values get a
    tick each (a span under a decade would otherwise have no labelled tick); more get the log
    ticks with their minor ticks labelled."""
    ax.set_xscale("log", base=base)
    distinct = []
    for x in np.unique(np.asarray(values, float)):
        if not distinct or x >= 1.15 * distinct[-1]:  # nearby values (a MoE point 5-8%
            distinct.append(x)                        # above its dense twin) share a tick
    if len(distinct) <= 8:
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(distinct))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: label(x)))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    else:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatterSciNotation(
            base=base, labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _y_range(ax, low, high, percent: bool = False) -> None:
    """The y range of the data (means -+ their error bars), 8% margin: fitted curves and their
    bands never stretch it. Percentages stay within 0..100; a panel of zeros gets 0..1 rather
    than -0.04..0.04."""
    values = np.concatenate([np.asarray(low, float), np.asarray(high, float)])
    values = values[np.isfinite(values)]
    if not len(values):
        return
    lo, hi = values.min(), values.max()
    if lo >= 0 and hi == 0:
        ax.set_ylim(0, 1)
        return
    margin = 0.08 * (hi - lo) or 0.05 * abs(hi) or 0.05
    lo, hi = lo - margin, hi + margin
    if percent:
        lo, hi = max(lo, -margin), min(hi, 100.0 + margin)  # room for a marker at 0 or 100
    ax.set_ylim(lo, hi)


def _legend_below(fig, axes, ncol: int = 4) -> None:
    """One legend for the figure, under the panels (never over the data)."""
    seen = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncol=min(len(seen), ncol), frameon=False)


def series(table: pd.DataFrame) -> pd.Series:
    """The series a run belongs to: 'Dense', or 'MoE, E=<n>' (runs with different expert
    counts are never pooled)."""
    experts = table["n_experts"].fillna(0).astype(int)
    return pd.Series(np.where(experts > 0, "MoE, E=" + experts.astype(str), LABELS["dense"]),
                     index=table.index)


def series_order(name: str) -> int:
    """Sort key of a `series` name: dense first, then by expert count."""
    return 0 if name == LABELS["dense"] else int(name.rsplit("=", 1)[1])


def _series_colors(names) -> dict[str, str]:
    moe = sorted((n for n in set(names) if n != LABELS["dense"]), key=series_order)
    return {LABELS["dense"]: OKABE_ITO[0],
            **{n: OKABE_ITO[1 + i % (len(OKABE_ITO) - 1)] for i, n in enumerate(moe)}}


def placement_note(table: pd.DataFrame) -> str:
    """How the study placed its MoE models, from its `param.plan.placement` (empty if none)."""
    values = table.get("param.plan.placement", pd.Series(dtype=str)).dropna().unique()
    return "; ".join(PLACEMENTS.get(v, v) for v in values)


def compute_vs_accuracy(table: pd.DataFrame, out: Path, shots: int = 0) -> list[Path]:
    """Dense and each MoE expert count as separate series against activated forward FLOPs per
    token; points are seed means with seed-std error bars. A power law (with a bootstrap band
    from 5 points) is drawn per series only where `honest_fit` keeps it; every fit tried is in
    the `_fits.json` with its RMS error and why it was not drawn."""
    table, longest = at_longest(table)
    scale, unit = _flops_unit(table["forward_flops_per_token"])
    x_col = f"activated_{unit.lower()}_per_token"
    table = table.assign(**{x_col: table["forward_flops_per_token"] / scale},
                         series=series(table))
    colors = _series_colors(table["series"])
    shown_panels = panels(shots, table)
    if not shown_panels:
        return []
    with plt.rc_context(STYLE):
        fig, axes = _panel_grid(len(shown_panels))
        plotted, fits = [], {}
        for ax, (metric, label) in zip(axes, shown_panels):
            for name, group in sorted(table.groupby("series"), key=lambda g: series_order(g[0])):
                stats = _seed_stats(group, [size_key(table), x_col], metric).sort_values(x_col)
                ax.errorbar(stats[x_col], stats["mean"], yerr=stats["std"], fmt="o",
                            color=colors[name], label=name, capsize=2)
                plotted.append(stats.assign(series=name, metric=metric))
                fit = honest_fit(group[x_col], group[metric], stats.rename(columns={x_col: "x"}),
                                 metric)
                if fit is None:
                    continue
                law = fit["law"]
                fits[f"{metric}|{name}"] = {**law.summary(), "drawn": fit["drawn"],
                                            "rms_error": fit["rms_error"],
                                            "not_drawn_because": fit["reason"]}
                if not fit["drawn"]:
                    continue
                xs = np.geomspace(stats[x_col].min(), stats[x_col].max(), 50)
                ax.plot(xs, law(xs), color=colors[name], alpha=0.8)
                if law.n_points >= 5:  # a bootstrap of fewer points says little
                    lo, hi = law.band(xs)
                    ax.fill_between(xs, lo, hi, color=colors[name], alpha=0.15, linewidth=0)
            _log_x(ax, table[x_col])
            shown = pd.concat([p for p in plotted if p["metric"].iloc[0] == metric])
            _y_range(ax, shown["mean"] - shown["std"], shown["mean"] + shown["std"],
                     percent=metric.startswith("eval/"))
            ax.set_xlabel(f"Activated {unit}/token")
            ax.set_ylabel(label)
        _legend_below(fig, axes)
        note = placement_note(table)
        data = pd.concat(plotted, ignore_index=True)
        fig.suptitle("Compute vs accuracy: forward FLOPs per token " + spread_title(data)
                     + "".join(f"\n{n}" for n in (f"MoE: {note}" if note else "", longest) if n))
    return _save(fig, data, out, "compute_vs_accuracy", fits)


def expert_count(table: pd.DataFrame, out: Path, shots: int = 0) -> list[Path]:
    """Each activated size as a line against the expert count (E = 1: the dense model)."""
    table, longest = at_longest(table)
    table = table.assign(experts=table["n_experts"].where(table["n_experts"] > 0, 1))
    sizes = table.groupby(size_key(table))["activated_params"].median().sort_values()
    colors = {size: OKABE_ITO[i % len(OKABE_ITO)] for i, size in enumerate(sizes.index)}
    shown_panels = panels(shots, table)
    if not shown_panels:
        return []
    with plt.rc_context(STYLE):
        fig, axes = _panel_grid(len(shown_panels))
        plotted = []
        for ax, (metric, label) in zip(axes, shown_panels):
            for size in sizes.index:
                group = table[table[size_key(table)] == size]
                stats = _seed_stats(group, ["experts"], metric).sort_values("experts")
                ax.errorbar(stats["experts"], stats["mean"], yerr=stats["std"], marker="o",
                            capsize=2, color=colors[size], label=size_label(sizes[size]))
                plotted.append(stats.assign(size=size, activated_params=sizes[size],
                                            metric=metric))
            ticks = sorted(table["experts"].unique())
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [("1\n(dense)" if t == 1 else str(int(t))) for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            shown = pd.concat([p for p in plotted if p["metric"].iloc[0] == metric])
            _y_range(ax, shown["mean"] - shown["std"], shown["mean"] + shown["std"],
                     percent=metric.startswith("eval/"))
            ax.set_xlabel("Experts per MoE layer (E)")
            ax.set_ylabel(label)
        _legend_below(fig, axes)
        note = placement_note(table)
        data = pd.concat(plotted, ignore_index=True)
        fig.suptitle("Expert count at fixed activated compute " + spread_title(data)
                     + "".join(f"\n{n}" for n in (note, longest) if n))
    return _save(fig, data, out, "expert_count")


def data_efficiency(table: pd.DataFrame, histories: pd.DataFrame, out: Path,
                    key: str = "lm_loss", smooth: int = 20) -> list[Path]:
    """`key` (a `load_histories` table of the runs of `table`) against training tokens and
    against training FLOPs (tokens x 3 x activated forward FLOPs per token, what the runs log
    as `train_flops`): one line per size and series, the mean over seeds of a `smooth`-step
    running mean. Colour: size; line: dense solid, MoE dashed (one dash pattern per E)."""
    runs = table.assign(series=series(table)).set_index("run_id")
    tokens_per_step = (runs["train_tokens"] / runs["param.train.steps"].astype(float))
    data = histories[histories["key"] == key].copy()
    data["tokens"] = data["step"] * data["run_id"].map(tokens_per_step)
    data["train_flops"] = 3 * data["tokens"] * data["run_id"].map(runs["forward_flops_per_token"])
    data["series"] = data["run_id"].map(runs["series"])
    data["activated_params"] = data["run_id"].map(runs["activated_params"])
    ladder = runs["train_tokens"].nunique() > 1  # runs of several lengths: one curve each
    data["budget"] = data["run_id"].map(runs["train_tokens"]) if ladder else 0.0
    data["smoothed"] = data.groupby("run_id")["value"].transform(
        lambda v: v.rolling(smooth, min_periods=1).mean())
    stride = max(1, int(data["step"].max()) // 200)  # ~200 points a run: enough for the eye
    data = data[(data["step"] % stride == 0) & (data["step"] > 0)]
    curves = (data.groupby(["activated_params", "series", "budget", "step"])
              .agg(tokens=("tokens", "mean"), train_flops=("train_flops", "mean"),
                   mean=("smoothed", "mean"), count=("smoothed", "count")).reset_index())
    sizes = sorted(curves["activated_params"].unique())
    names = sorted(curves["series"].unique(), key=series_order)
    dashes = {n: (None if n == "Dense" else [(4, 2), (1, 1.5), (6, 2, 1, 2), (2, 2)][i % 4])
              for i, n in enumerate(names[1:] if "Dense" in names else names)}
    dashes.setdefault("Dense", None)
    ncol = 2 if len(names) * len(sizes) > 4 else 4
    legend_rows = -(-len(names) * len(sizes) // ncol)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(WIDE[0], WIDE[1] + 0.2 * legend_rows),
                                 layout="constrained")
        for ax, x, xlabel in ((axes[0], "tokens", "Training tokens"),
                              (axes[1], "train_flops", "Training FLOPs")):
            for (size, name, budget), group in sorted(
                    curves.groupby(["activated_params", "series", "budget"]),
                    key=lambda g: (g[0][0], series_order(g[0][1]), g[0][2])):
                line, = ax.plot(group[x], group["mean"],
                                color=OKABE_ITO[sizes.index(size) % len(OKABE_ITO)],
                                label=f"{size_label(size)}, {name}",
                                alpha=0.55 + 0.45 * (budget == curves["budget"].max()))
                if dashes[name]:
                    line.set_dashes(dashes[name])
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Training loss (nats/token)" if key == "lm_loss" else key)
        _legend_below(fig, axes, ncol=ncol)
        fig.suptitle(f"Data efficiency: against tokens and compute ({smooth}-step running "
                     "mean, mean over seeds)")
    return _save(fig, curves, out, "data_efficiency")


def _drop_label(column: str) -> str:
    """'moe/layer0/dropped_top2' -> 'layer 0, 2nd choices'."""
    match = re.fullmatch(r"moe/layer(\d+)/dropped_top(\d+)", column)
    if not match:
        return column.removeprefix("moe/").replace("_", " ")
    rank = {"1": "1st", "2": "2nd", "3": "3rd"}.get(match[2], f"{match[2]}th")
    return f"layer {match[1]}, {rank} choices"


def routing_health(loads: dict[str, dict[str, list[float]]], table: pd.DataFrame,
                   out: Path) -> list[Path]:
    """`loads`: run name -> {"layer<i>": per-expert load} (the runs' expert_load.json)."""
    rows = [(run, layer, e, v) for run, layers in loads.items()
            for layer, values in layers.items() for e, v in enumerate(values)]
    data = pd.DataFrame(rows, columns=["run", "layer", "expert", "load"])
    drop_cols = sorted(c for c in table.columns if c.startswith("moe/") and "dropped" in c)
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(WIDE[0], 3.6), layout="constrained")
        if len(data):
            grid = data.pivot_table(index=["run", "layer"], columns="expert", values="load")
            image = left.imshow(grid.values, aspect="auto", cmap="cividis")
            labels = [f"{run}, layer {layer.removeprefix('layer')}" for run, layer in grid.index]
            step = -(-len(labels) // 12)  # at most 12 labelled rows: 8 pt text in 2.5 inches
            left.set_yticks(range(0, len(labels), step), labels[::step])
            left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=8))
            left.set_xlabel("Expert")
            left.grid(False)
            fig.colorbar(image, ax=left, label="Load (x fair share)")
        left.set_title("Expert load per MoE layer (validation)")
        moe = table[table["family"] == "moe"]
        if drop_cols and len(moe):
            drops = moe.set_index("run_name")[drop_cols] * 100
            rows = np.arange(len(drops))
            height = 0.8 / len(drop_cols)
            for i, col in enumerate(drop_cols):
                right.barh(rows + i * height, drops[col], height, label=_drop_label(col),
                           color=OKABE_ITO[(i + 1) % len(OKABE_ITO)])
            step = -(-len(drops) // 12)
            right.set_yticks(rows[::step] + 0.4 - height / 2, list(drops.index)[::step])
            right.invert_yaxis()
            right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
                         ncol=min(2, len(drop_cols)))
        right.set_xlabel("Dropped assignments (%)")
        right.set_title("Capacity overflow at the end of training")
    return _save(fig, data, out, "routing_health")
