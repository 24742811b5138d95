"""Runs of an experiment or a study as a tidy pandas table (one row per run), and histories.

Every function downstream takes this table, so the analysis also works offline on an exported
CSV or Parquet file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from glam import tracking

# Columns every analysis relies on, from tags and metrics.
NUMERIC_TAGS = ("n_experts", "top_k", "granularity", "shared_experts", "total_params",
                "activated_params", "forward_flops_per_token", "seed")


def _experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} at {tracking.redact(client.tracking_uri)}")
    return [exp.experiment_id]


def load_runs(tracking_uri: str, experiment: str | None = None,
              parent_run_id: str | None = None, status: str | None = "FINISHED") -> pd.DataFrame:
    """One row per training run (study parents excluded): params, tags, final metrics and
    `best_val_loss`. `parent_run_id` restricts to one study's children."""
    client = tracking.client(tracking_uri)
    ids = ([client.get_run(parent_run_id).info.experiment_id] if parent_run_id
           else _experiment_ids(client, experiment))
    filters = []
    if parent_run_id:
        filters.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if status:
        filters.append(f"attributes.status = '{status}'")
    runs = client.search_runs(ids, filter_string=" and ".join(filters), max_results=50_000)
    rows = []
    for r in runs:
        tags = r.data.tags
        if tags.get("study_role") == "parent" or "family" not in tags:
            continue
        row = {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
               "experiment_id": r.info.experiment_id,
               "parent_run_id": tags.get("mlflow.parentRunId"),
               "study": tags.get("study"), "study_point": tags.get("study_point"),
               "family": tags["family"], "model": tags.get("model"),
               "run_seconds": ((r.info.end_time - r.info.start_time) / 1000
                               if r.info.end_time and r.info.start_time else None)}
        row.update({k: float(tags[k]) for k in NUMERIC_TAGS if k in tags})
        row.update({f"param.{k}": v for k, v in r.data.params.items()})
        # The dense shape: what dense and MoE points of one size share (preset names differ).
        row["size"] = (f"d{row.get('param.model.d_model', '?')}-L{row.get('param.model.n_layers', '?')}"
                       f"-F{row.get('param.model.d_ff', '?')}")
        row.update(r.data.metrics)
        if "val_loss" in r.data.metrics:
            row["best_val_loss"] = min(m.value for m in client.get_metric_history(
                r.info.run_id, "val_loss"))
        rows.append(row)
    return pd.DataFrame(rows)


def load_histories(tracking_uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Long table (run_id, key, step, value) of the per-step metrics `keys`."""
    client = tracking.client(tracking_uri)
    rows = [(run_id, key, m.step, m.value) for run_id in run_ids for key in keys
            for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"]).sort_values(
        ["run_id", "key", "step"], ignore_index=True)


def export(table: pd.DataFrame, path: str | Path) -> Path:
    """Write `table` as CSV or Parquet, by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run table at {path}; export one with glam-analyze --export")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
