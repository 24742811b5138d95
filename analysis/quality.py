"""The data-quality study (GLaM section 4): its arms, its figure and its verdicts.

A run's arm comes from its logged config: `filtered` when `data.quality.selection` is not
`none`, else `unfiltered`, with `k x` appended when `train.token_multiple` is k != 1 (the
`unfiltered_3x` arm of `sweeps/quality_arm/`).

- `figure`: validation loss on the clean held-out text (`val_loss_clean`: the sources the filter
  does not touch, the same text in every arm), NLG and NLU averages against training tokens;
  one colour per arm, solid dense and dashed MoE, the mean over seeds with a +-1 std band.
- `verdicts`: at the end of training, does the filtered arm beat the unfiltered one at the same
  tokens, and the unfiltered one with 3x the tokens, and is the filtered-unfiltered gap larger
  on NLG than on NLU (the paper's finding), each with the seed spread.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis.figures import LABELS, STYLE, WIDE, _save

SELECTION, MULTIPLE = "param.data.quality.selection", "param.train.token_multiple"
# Okabe-Ito colours, safe for colour-blind readers.
ARM_COLORS = {"filtered": "#009E73", "unfiltered": "#E69F00"}
OTHER_COLOR = "#0072B2"
FAMILY_LINES = {"dense": "-", "moe": "--"}


def short_label(label: str) -> str:
    """A panel's label short enough to stand beside a 2-inch-high panel."""
    for long, short in ((" average", " avg."), ("(accuracy, %)", "(acc. %)"),
                        ("(EM, %)", "(EM %)"), ("(nats/token)", "(nats/tok.)")):
        label = label.replace(long, short)
    return label


def panels(shots: int) -> list[tuple[str, str, bool]]:
    """(metric, axis label, lower is better) of the figure's panels."""
    return [("val_loss_clean", "Clean held-out loss (nats/token)", True),
            (f"eval/nlg_avg/{shots}shot", f"NLG average, {shots}-shot (EM, %)", False),
            (f"eval/nlu_avg/{shots}shot", f"NLU average, {shots}-shot (accuracy, %)", False),
            ("knowledge/bits", "Knowledge stored (bits)", False)]


def _arm(selection, multiple) -> str | None:
    if selection is None or pd.isna(selection):
        return None
    base = "unfiltered" if selection in ("none", "Selection.none") else "filtered"
    m = pd.to_numeric(multiple, errors="coerce")
    return base if pd.isna(m) or m == 1 else f"{base} {m:g}x"


def arms(table: pd.DataFrame) -> pd.Series:
    """The arm of each run of `table` (a `load_runs` table), by row: None for a run without its
    quality selection logged (a run older than the filter); a run without a token multiple
    logged trained on x1."""
    selections = table[SELECTION] if SELECTION in table else [None] * len(table)
    multiples = table[MULTIPLE] if MULTIPLE in table else [1.0] * len(table)
    return pd.Series([_arm(s, m) for s, m in zip(selections, multiples)], index=table.index,
                     dtype=object)


def is_study(table: pd.DataFrame) -> bool:
    """Whether `table` holds runs of two or more arms, one of them filtered."""
    found = set(arms(table).dropna())
    return len(found) >= 2 and "filtered" in found


def curves(table: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """Long table (arm, family, run_id, tokens, key, value) of `histories` (a `load_histories`
    table of the runs of `table`), tokens = step x train.batch_size x model.seq_len."""
    runs = table.assign(arm=arms(table)).set_index("run_id")
    tokens_per_step = (runs["param.train.batch_size"].astype(float)
                       * runs["param.model.seq_len"].astype(float))
    data = histories.copy()
    data["tokens"] = data["step"] * data["run_id"].map(tokens_per_step)
    data["arm"] = data["run_id"].map(runs["arm"])
    data["family"] = data["run_id"].map(runs["family"])
    return data


def figure(table: pd.DataFrame, histories: pd.DataFrame, out: Path,
           shots: int = 0) -> list[Path]:
    """`data_quality.{pdf,png,csv}` under `out`: the panels of `panels(shots)` that have a
    history, against training tokens; the CSV holds the plotted means, stds and seed counts.

    Raises:
      ValueError: `histories` holds none of the panels' metrics.
    """
    data = curves(table, histories).dropna(subset=["arm", "value"])
    shown = [p for p in panels(shots) if (data["key"] == p[0]).any()]
    if not shown:
        raise ValueError("no history of " + ", ".join(m for m, _, _ in panels(shots)))
    plotted = []
    with plt.rc_context(STYLE):
        cols = len(shown) if len(shown) <= 3 else 2
        n_rows = -(-len(shown) // cols)
        fig, axes = plt.subplots(n_rows, cols, figsize=(WIDE[0], WIDE[1] * n_rows + 0.3),
                                 layout="constrained", squeeze=False)
        axes = axes.ravel()
        for ax, (metric, label, _) in zip(axes, shown):
            rows = data[data["key"] == metric]
            for (arm, family), group in rows.groupby(["arm", "family"]):
                stats = (group.groupby("tokens")["value"].agg(["mean", "std", "count"])
                         .reset_index().fillna({"std": 0.0}))
                color = ARM_COLORS.get(arm, OTHER_COLOR)
                ax.plot(stats["tokens"], stats["mean"], FAMILY_LINES.get(family, ":"),
                        color=color, marker="o", markersize=3,
                        label=f"{arm}, {LABELS.get(family, family)}")
                ax.fill_between(stats["tokens"], stats["mean"] - stats["std"],
                                stats["mean"] + stats["std"], color=color, alpha=0.15,
                                linewidth=0)
                plotted.append(stats.assign(arm=arm, family=family, metric=metric))
            ax.set_xlabel("Training tokens")
            ax.set_ylabel(short_label(label))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3),
                   frameon=False)
        fig.suptitle("Data quality: filtered vs unfiltered web text (bands: seed std)")
    return _save(fig, pd.concat(plotted, ignore_index=True), out, "data_quality")


def _spread(a: pd.Series, b: pd.Series) -> float | None:
    """The seed spread of mean(a) - mean(b): the two stds in quadrature; None with one seed on
    a side."""
    return None if len(a) < 2 or len(b) < 2 else math.hypot(a.std(ddof=1), b.std(ddof=1))


def _compare(a: pd.Series, b: pd.Series, lower_better: bool) -> str:
    """"<mean a> vs <mean b> (difference, spread): verdict for `a`": better or worse when the
    difference exceeds the spread (the seed stds added in quadrature), tied within it
    otherwise; with one seed on a side there is no spread to judge by."""
    diff = a.mean() - b.mean()
    wins = diff < 0 if lower_better else diff > 0
    head = f"{a.mean():.3g} vs {b.mean():.3g} (difference {diff:+.2g}"
    spread = _spread(a, b)
    if spread is None:
        return head + ", one seed: no spread): " + ("better" if wins else "worse" if diff
                                                    else "tied")
    verdict = ("tied within the seed spread" if abs(diff) <= spread
               else "better" if wins else "worse")
    return head + f", spread {spread:.2g}): {verdict}"


def verdicts(table: pd.DataFrame, shots: int = 0) -> list[str]:
    """The study's findings as sentences, per family, from the runs' final metrics."""
    table = table.assign(arm=arms(table)).dropna(subset=["arm"])
    lines = []
    metrics = [(m, label.split(" (")[0], low) for m, label, low in panels(shots) if m in table]
    for family, runs in table.groupby("family"):
        name = LABELS.get(family, family)
        filtered = runs[runs["arm"] == "filtered"]
        for other in sorted(set(runs["arm"]) - {"filtered"}):
            rival = runs[runs["arm"] == other]
            parts = [f"{label} " + _compare(filtered[m].dropna(), rival[m].dropna(), low)
                     for m, label, low in metrics
                     if filtered[m].notna().any() and rival[m].notna().any()]
            if parts:
                lines.append(f"{name}, filtered vs {other} (n = {len(filtered)} vs "
                             f"{len(rival)}): " + "; ".join(parts))
        unfiltered = runs[runs["arm"] == "unfiltered"]
        nlg, nlu = (f"eval/nlg_avg/{shots}shot", f"eval/nlu_avg/{shots}shot")
        if nlg in runs and nlu in runs:
            gap_nlg = filtered[nlg].mean() - unfiltered[nlg].mean()
            gap_nlu = filtered[nlu].mean() - unfiltered[nlu].mean()
            if math.isnan(gap_nlg) or math.isnan(gap_nlu):
                continue
            spreads = [_spread(filtered[m].dropna(), unfiltered[m].dropna()) for m in (nlg, nlu)]
            text = [f"{gap:+.3g}" + ("" if spread is None else f" (spread {spread:.2g})")
                    for gap, spread in zip((gap_nlg, gap_nlu), spreads)]
            within = None not in spreads and abs(gap_nlg - gap_nlu) <= math.hypot(*spreads)
            lines.append(f"{name}: the filtered-unfiltered gap is {text[0]} points on NLG and "
                         f"{text[1]} on NLU: "
                         + ("the two differ by less than the seed spread" if within
                            else "larger on NLG, as in the paper" if gap_nlg > gap_nlu
                            else "not larger on NLG (the paper found it larger)"))
    return lines


def _reached(tokens, values, target: float, lower_better: bool) -> float | None:
    """The first training-token count at which a curve reaches `target`, linearly interpolated
    between its points; None if it never does."""
    prev = None
    for t, v in zip(tokens, values):
        if (v <= target) if lower_better else (v >= target):
            if prev is None:
                return float(t)
            (t0, v0) = prev
            return float(t0 + (t - t0) * (target - v0) / (v - v0)) if v != v0 else float(t)
        prev = (t, v)
    return None


def matching_multiples(table: pd.DataFrame, histories: pd.DataFrame,
                       shots: int = 0) -> list[str]:
    """For each family and metric: at how many times the filtered arm's tokens does the
    unfiltered data (the `unfiltered 3x` arm's seed-mean curve, interpolated between its
    evaluations) reach the filtered arm's final seed-mean value? '<= 1x' when the unfiltered
    run at the same tokens already does; '> 3x' when not even the end of the 3x curve does."""
    table = table.assign(arm=arms(table)).dropna(subset=["arm"])
    data = curves(table, histories).dropna(subset=["arm", "value"])
    lines = []
    for family, runs in table.groupby("family"):
        filtered = runs[runs["arm"] == "filtered"]
        if filtered.empty or "unfiltered 3x" not in set(runs["arm"]):
            continue
        budget = (filtered["param.train.steps"].astype(float)
                  * filtered["param.train.batch_size"].astype(float)
                  * filtered["param.model.seq_len"].astype(float)).max()
        parts = []
        for metric, label, low in panels(shots):
            if metric not in filtered or filtered[metric].isna().all():
                continue
            target = filtered[metric].mean()
            curve = (data[(data["family"] == family) & (data["arm"] == "unfiltered 3x")
                          & (data["key"] == metric)]
                     .groupby("tokens")["value"].mean().sort_index())
            if curve.empty:
                continue
            at = _reached(curve.index, curve.to_numpy(), target, low)
            multiple = ("> {:g}x".format(curve.index.max() / budget) if at is None
                        else "<= 1x" if at <= budget else f"{at / budget:.2f}x")
            parts.append(f"{label.split(' (')[0]} {target:.3g} at {multiple}")
        if parts:
            lines.append(f"{LABELS.get(family, family)}: the unfiltered data matches the "
                         "filtered arm's final value at " + "; ".join(parts)
                         + " of the filtered arm's tokens")
    return lines
