"""`glam-eval`: score a trained run with EleutherAI's lm-evaluation-harness and log the results
to the run in MLflow.

    glam-data lm-eval-tasks --out tasks/world        # the world's tasks as lm-eval tasks
    glam-eval outputs/runs/<run> --tasks glam_world_facts,glam_world_qa --include_path tasks/world
    glam-eval <mlflow run id> --tasks lambada_openai --num_fewshot 0 --limit 100

Each numeric result becomes the metric `lm_eval/<task>/<metric>` of the run that trained the
model (`<metric>.<filter>` for a filter other than lm-eval's `none`), and the whole results
JSON the artifact `lm_eval/results_<tasks>.json` (also written under `--out`), so runs compare
in the MLflow UI and in glam-analyze's run tables. The run is checked before evaluating. Needs the `eval` extra (`pip install 'glam[eval]'`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path


def metric_key(task: str, name: str) -> str | None:
    """The MLflow key of lm-eval's result `name` ("acc,none", "exact_match,strip") of `task`;
    None for what is not a metric (its alias, sample counts)."""
    metric, _, filtered = name.partition(",")
    if not filtered or metric == "alias":
        return None
    key = metric if filtered == "none" else f"{metric}.{filtered}"
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"lm_eval/{task}/{key}")


def metrics(results: dict) -> dict[str, float]:
    """{MLflow key: value} of every finite number in lm-eval's `results["results"]`."""
    out = {}
    for task, values in results.get("results", {}).items():
        for name, value in values.items():
            key = metric_key(task, name)
            if key and isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
    return out


def tracking_uri(args: argparse.Namespace) -> str:
    """`--tracking-uri`; else the store the run directory's `config.yaml` names; else
    $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    if args.tracking_uri:
        return args.tracking_uri
    saved = Path(args.run) / "config.yaml"
    if saved.is_file():
        import yaml

        uri = ((yaml.safe_load(saved.read_text()) or {}).get("logger") or {}).get("tracking_uri")
        if uri and "***" not in uri:  # a redacted password cannot be used
            return uri
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def _check_run(store, run_id: str | None, uri: str) -> None:
    """Refuse, before evaluating, a run the results cannot be logged to.

    Raises:
      ValueError: the export names no run, or the store has no active run of that id.
    """
    from mlflow.exceptions import MlflowException

    from glam.tracking import redact

    if run_id is None:
        raise ValueError("the export names no MLflow run; give --no-log to print the results")
    try:
        stage = store.get_run(run_id).info.lifecycle_stage
    except MlflowException:
        stage = None
    if stage != "active":
        raise ValueError(f"--tracking-uri: no active MLflow run {run_id} at {redact(uri)}; give "
                         "the store the run was logged to, or --no-log")


def evaluate(args: argparse.Namespace) -> dict:
    """Run lm-eval on the export `args.run` names; write the results JSON under `args.out`;
    log to the model's MLflow run unless `--no-log` (the run checked first).

    Raises:
      FileNotFoundError / ValueError: no usable export, a task lm-eval does not know, or no
        MLflow run to log to.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from glam.eval.lm_harness import GlamLM
    from glam.tracking import client

    uri = tracking_uri(args)
    lm = GlamLM(args.run, batch_size=args.batch_size, tracking_uri=uri)
    store = None if args.no_log else client(uri)
    if store is not None:
        _check_run(store, lm.run_id, uri)
    tasks = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: lm-eval knows no task {', '.join(unknown)}"
                         + ("" if args.include_path else "; give the folder of your task YAML "
                            "files with --include_path"))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=manager,
                                      batch_size=args.batch_size)
    found = metrics(results)
    for key, value in sorted(found.items()):
        print(f"{key}: {value:.4g}")
    folder = Path(args.out or Path("outputs") / "lm_eval" / (lm.run_id or Path(args.run).name))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"results_{'_'.join(tasks)[:100]}.json"
    path.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
    print(f"results: {path}")
    if store is None:
        return found
    entries = [_metric(k, v) for k, v in found.items()]
    for lo in range(0, len(entries), 1000):  # MLflow takes at most 1,000 metrics a call
        store.log_batch(lm.run_id, metrics=entries[lo : lo + 1000])
    store.log_artifact(lm.run_id, str(path), artifact_path="lm_eval")
    print(f"logged {len(found)} metrics and lm_eval/{path.name} to MLflow run {lm.run_id}")
    return found


def _metric(key: str, value: float):
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def main(argv: list[str] | None = None) -> None:
    """`glam-eval RUN --tasks T1,T2 [--include_path DIR] [--num_fewshot K] [--limit N]`."""
    parser = argparse.ArgumentParser(prog="glam-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory, export folder or MLflow run id")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", help="a folder of lm-eval task YAML files (e.g. "
                                               "glam-data lm-eval-tasks --out DIR)")
    parser.add_argument("--num_fewshot", type=int, help="demonstrations per prompt "
                                                        "(default: each task's own)")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--batch_size", type=int, default=16, help="rows per compiled call")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the run directory's "
                                               "logger.tracking_uri, else "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--out", help="folder of the results JSON (default: "
                                      "outputs/lm_eval/<run id>)")
    parser.add_argument("--no-log", action="store_true", help="print only, log nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name, least in (("num_fewshot", 0), ("limit", 1), ("batch_size", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} must be at least {least}, got {value}")
    if args.include_path and not Path(args.include_path).is_dir():
        parser.error(f"--include_path {args.include_path}: not a folder")
    if importlib.util.find_spec("lm_eval") is None:
        print("glam-eval: lm-eval is not installed; pip install 'glam[eval]'", file=sys.stderr)
        raise SystemExit(2)
    from mlflow.exceptions import MlflowException

    try:
        evaluate(args)
    except (FileNotFoundError, ValueError, MlflowException) as err:
        print(f"glam-eval: {str(err).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
