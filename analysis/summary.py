"""The few numbers a study comes down to: dense vs MoE per size, and the metric per expert
count, each as mean +- standard deviation over seeds."""

from __future__ import annotations

import pandas as pd

from analysis.figures import point_keys

METRICS = ("val_loss", "val_loss_clean", "eval/nlg_avg/0shot", "eval/nlu_avg/0shot",
           "knowledge/bits", "knowledge/fraction")


def _mean_std(group: pd.Series) -> str:
    return f"{group.mean():.3f} +- {group.std(ddof=1) if len(group) > 1 else 0.0:.3f} (n={len(group)})"


def dense_vs_moe(table: pd.DataFrame) -> pd.DataFrame:
    """Rows: the point (activated size; training tokens in a ladder) and the arm when the table
    has one (`analysis.quality`); columns: metric x family."""
    metrics = [m for m in METRICS if m in table]
    keys = point_keys(table) + (["arm"] if "arm" in table else [])
    return table.groupby([*keys, "family"])[metrics].agg(_mean_std).unstack("family")


def by_experts(table: pd.DataFrame) -> pd.DataFrame:
    """Rows: activated size, arm (when the table has one), expert count."""
    metrics = [m for m in METRICS if m in table]
    keys = point_keys(table) + (["arm"] if "arm" in table else [])
    return table.groupby([*keys, "n_experts"])[metrics].agg(_mean_std)


def time_split(table: pd.DataFrame) -> str | None:
    """Where the runs' time went: their summed time inside the runs (MLflow start to end) and
    the shares spent in training steps, in compilation (to the first step's result) and in the
    rest; then the trainer's set-up before each run (`setup_seconds`) and the training share
    with it counted. None without the columns."""
    columns = ("run_seconds", "train_seconds", "compile_seconds")
    if not all(c in table for c in columns):
        return None
    rows = table.dropna(subset=list(columns))
    inside = rows["run_seconds"].sum()
    if not inside:
        return None
    train = rows["train_seconds"].sum()
    compile_ = rows["compile_seconds"].sum()
    text = (f"Run time: {inside:.0f} s inside {len(rows)} runs: {train / inside:.0%} training "
            f"steps, {compile_ / inside:.0%} compilation, {1 - (train + compile_) / inside:.0%} "
            "evaluation, checkpoints and logging")
    setup = rows["setup_seconds"].fillna(0).sum() if "setup_seconds" in rows else 0.0
    if setup:
        text += (f"; set-up before the runs (corpus, tasks, initial state) {setup:.0f} s more, "
                 f"{train / (inside + setup):.0%} training with it")
    return text


def print_summary(table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.max_colwidth", 40):
        if table["family"].nunique() > 1 and table["n_experts"].nunique() <= 2:
            print("Dense vs MoE (mean +- seed std):")
            print(dense_vs_moe(table).to_string())
        else:
            print("By expert count (0 = dense; mean +- seed std):")
            print(by_experts(table).to_string())
    split = time_split(table)
    if split:
        print(split)


def points(table: pd.DataFrame) -> pd.DataFrame:
    """One row per study point (size, arm, expert count): the seeds' mean of each metric, the
    best validation loss any seed reached, and the seed count."""
    metrics = [m for m in METRICS if m in table]
    keys = point_keys(table) + (["arm"] if "arm" in table else []) + ["n_experts"]
    agg = {m: "mean" for m in metrics}
    if "best_val_loss" in table:
        agg["best_val_loss"] = "min"
    out = table.groupby(keys).agg(agg)
    out["seeds"] = table.groupby(keys).size()
    return out.reset_index()


def headline(table: pd.DataFrame) -> dict[str, float]:
    """The study's comparison as MLflow metric names: seed-mean validation loss of the dense
    runs and of each expert count (`headline/val_loss/dense`, `.../moe_E8`), and each expert
    count's loss gain over dense, averaged over sizes (`headline/val_loss_gain/moe_E8`;
    positive: MoE lower)."""
    if "val_loss" not in table or table["val_loss"].isna().all():
        return {}
    keys = point_keys(table) + (["arm"] if "arm" in table else [])
    means = table.groupby([*keys, "n_experts"])["val_loss"].mean().unstack("n_experts")
    out = {}
    for e in means.columns:
        name = "dense" if e == 0 else f"moe_E{int(e)}"
        out[f"headline/val_loss/{name}"] = float(means[e].mean())
        if e != 0 and 0 in means.columns:
            out[f"headline/val_loss_gain/{name}"] = float((means[0] - means[e]).mean())
    return out
