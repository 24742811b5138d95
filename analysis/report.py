"""What `glam-analyze` does once its arguments are read: the run table from MLflow (or a file),
the figures and fits (`analyze`), the energy table, and the summary, verdicts and data-quality
lines on the terminal (`report`)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import axes, energy, figures, knowledge, law_choice, quality
from analysis.fit import fit_routed_law
from analysis.runs import export, load_histories, load_runs, read_table
from analysis.summary import print_summary
from glam import tracking

# The findings a study is judged by: knowledge stored, and recall of the world's QA.
VERDICT_METRICS = ("knowledge/bits", "eval/world_qa_seen/0shot", "val_loss")
LAW_COLUMNS = ("activated_params", "train_tokens", "val_loss", "n_experts")
LAW_BOOT = 100  # bootstrap refits of each law form compared


def find_study_parent(client: MlflowClient, study: str) -> str:
    exp = client.get_experiment_by_name(study)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string="tags.study_role = 'parent'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"glam-analyze: no parent run of study {study!r} at {tracking.redact(client.tracking_uri)}; "
                         f"run it first: glam-train -m +study={study}")
    return runs[0].info.run_id


def expert_loads(client: MlflowClient, table: pd.DataFrame) -> dict:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    loads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in table[table["family"] == "moe"].iterrows():
            try:
                path = client.download_artifacts(row["run_id"], "expert_load.json", tmp)
            except Exception:  # a run without the artifact (older, or still running)
                continue
            loads[row["run_name"]] = json.loads(Path(path).read_text())
    return loads


def law_comparison(table: pd.DataFrame, out: Path) -> list[Path]:
    """When the runs vary the expert count or the granularity, the loss-law forms fitted along
    each axis (`analysis.law_choice.compare_forms`), one printed line per form with its held-out
    error (or why it was skipped) and the form that fits better, all written to
    `<out>/law_comparison.json`; nothing when they vary neither. Never raises for runs that
    cannot determine a form."""
    missing = [c for c in LAW_COLUMNS if c not in table]
    if missing:
        print(f"glam-analyze: law forms skipped: the table lacks {missing}")
        return []
    comparisons = law_choice.compare_forms(law_choice.points(table), n_boot=LAW_BOOT)
    if not comparisons:
        return []
    for c in comparisons:
        where = f" at E = {c.experts:g}" if c.axis == "granularity" else ""
        print(f"Law forms over {c.axis}{where} ({len(c.runs)} runs; held-out RMSE of log loss, "
              "K-fold over configurations):")
        for form, error in c.held_out.items():
            print(f"  {form}: {error:.4g}" + (f"  <- fits better: {c.reason}"
                                              if form == c.chosen else ""))
        for form, why in c.skipped.items():
            print(f"  {form}: skipped: {why}")
        if c.chosen is None:
            print(f"  fits better: none ({c.reason})")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "law_comparison.json"
    path.write_text(json.dumps({"comparisons": [c.summary() for c in comparisons]}, indent=1))
    return [path]


def analyze(table: pd.DataFrame, out: Path, which: list[str], shots: int,
            client: MlflowClient | None) -> list[Path]:
    written: list[Path] = []
    table = table.copy()  # one block per dtype: the figures add columns to it
    # A data-quality study's arms are not seeds: the per-size and per-E figures would pool them.
    arms = quality.is_study(table)
    if ("compute_vs_accuracy" in which and not arms
            and table["forward_flops_per_token"].nunique() >= 2):
        written += figures.compute_vs_accuracy(table, out, shots)
    if "expert_count" in which and not arms and table["n_experts"].nunique() >= 2:
        written += figures.expert_count(table, out, shots)
    if ("knowledge_capacity" in which and not arms and knowledge.BITS in table
            and table[knowledge.BITS].notna().any()):
        written += knowledge.knowledge_capacity(table, out)
        if client is not None:
            histories = load_histories(client.tracking_uri, list(table["run_id"]),
                                       [knowledge.BITS])
            written.append(knowledge.knowledge_history(table, histories, out))
    if client is not None and "data_efficiency" in which:
        histories = load_histories(client.tracking_uri, list(table["run_id"]), ["lm_loss"])
        written += figures.data_efficiency(table, histories, out)
    if client is not None and "data_quality" in which and arms:
        keys = [metric for metric, _, _ in quality.panels(shots)]
        histories = load_histories(client.tracking_uri, list(table["run_id"]), keys)
        try:
            written += quality.figure(table, histories, out, shots)
        except ValueError as err:  # runs without evaluation histories
            print(f"glam-analyze: data_quality figure skipped: {err}")
    if client is not None and "routing_health" in which and (table["family"] == "moe").any():
        written += figures.routing_health(expert_loads(client, table), table, out)
    experts = table["n_experts"].where(table["n_experts"] > 0, 1)
    if table[figures.size_key(table)].nunique() >= 2 and experts.nunique() >= 2 and "val_loss" in table:
        try:
            law = fit_routed_law(table["activated_params"], experts, table["val_loss"])
        except ValueError:  # sizes and expert counts not crossed: nothing to fit
            law = None
        if law is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "routed_law_fit.json"
            path.write_text(json.dumps(law.summary(), indent=1))
            written.append(path)
    if "design_axes" in which and axes.varied(table):
        written += axes.figure(table, out, figures.point_keys(table))
    if not arms and (experts.nunique() >= 2 or ("granularity" in table and
                                                 table["granularity"].fillna(1).nunique() >= 2)):
        written += law_comparison(table, out)
    return written


def report(args: argparse.Namespace) -> None:
    """Runs `glam-analyze` with its parsed arguments (see `glam.cli.analyze`).

    Raises:
      SystemExit: no study parent run of that name, or no finished runs to analyse.
    """
    if args.paper_table:
        print(energy.paper_table(args.hardware).to_string(index=False, float_format="%.4g"))
        print(f"(device-hours and energy modelled from training FLOPs and the {args.hardware} "
              "hardware profile, glam.hardware; not measured)")
        if not (args.study or args.parent or args.experiment or args.table):
            return
    client, parent = None, None
    if args.table:
        table, name = read_table(args.table), Path(args.table).stem
    else:
        client = tracking.client(args.tracking_uri)
        parent = args.parent or (find_study_parent(client, args.study) if args.study else None)
        table = load_runs(args.tracking_uri, args.experiment, parent)
        name = args.study or args.experiment or parent
    if table.empty:
        raise SystemExit("glam-analyze: no finished runs to analyse")
    table = axes.with_axes(table)  # a design axis a study varies tells its points apart
    out = Path(args.out or Path("outputs") / "analysis" / str(name))
    written = analyze(table, out, args.figures, args.shots, client)
    written.append(export(table, out / "runs.csv"))
    if args.export:
        written.append(export(table, args.export))
    cost = energy.run_energy(table, args.hardware)
    written.append(export(cost, out / f"energy_{args.hardware}.csv"))
    if parent is not None:
        for path in written:
            client.log_artifact(parent, str(path), artifact_path="analysis")
    if quality.is_study(table):
        table = table.assign(arm=quality.arms(table))
    print_summary(table)
    lines = knowledge.verdicts(table, VERDICT_METRICS)
    if lines:
        print("\nVerdicts (final metrics; gain: MoE better when positive; spread: the two seed "
              "stds in quadrature):")
        for line in lines:
            print(f"  {line}")
    lines = axes.verdicts(table, (*VERDICT_METRICS, axes.BITS_PER_PARAM),
                          figures.point_keys(table))
    if lines:
        print("\nDesign axes (each setting against GLaM's at the same point; gain: better when "
              "positive; spread: the two seed stds in quadrature):")
        for line in lines:
            print(f"  {line}")
    if quality.is_study(table):
        print("\nData quality (final metrics; spread: seed stds in quadrature):")
        for line in quality.verdicts(table, args.shots):
            print(f"  {line}")
        if client is not None:
            keys = [metric for metric, _, _ in quality.panels(args.shots)]
            histories = load_histories(client.tracking_uri, list(table["run_id"]), keys)
            print("Tokens the unfiltered data needs (along the 3x arm's curve):")
            for line in quality.matching_multiples(table, histories, args.shots):
                print(f"  {line}")
    total = energy.study_energy(table, args.hardware)
    print(f"\n{total['runs']} runs: {total['device_hours']:.3g} device-hours, "
          f"{total['energy_kwh']:.3g} kWh on {args.hardware} (modelled from the runs' training "
          f"FLOPs and the {args.hardware} hardware profile, glam.hardware; not measured)")
    print(f"figures and tables in {out.resolve()}" + (f" (also on MLflow run {parent})"
                                                      if parent else ""))

