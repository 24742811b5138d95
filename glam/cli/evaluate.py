"""`glam-eval`: score a trained run with EleutherAI's lm-evaluation-harness and log the results
to the run in MLflow.

    glam-data lm-eval-tasks --out tasks/world        # the world's tasks as lm-eval tasks
    glam-eval outputs/runs/<run> --tasks glam_world_facts,glam_world_qa --include_path tasks/world
    glam-eval <mlflow run id> --tasks lambada_openai --num_fewshot 0 --limit 100

Each numeric result becomes the metric `lm_eval/<task>/<metric>` of the run that trained the
model (`<metric>.<filter>` for a filter other than lm-eval's `none`), and the whole results
JSON the artifact `lm_eval/results_<tasks>.json`, so runs compare in the MLflow UI and in
glam-analyze's run tables. Needs the `eval` extra (`pip install 'glam[eval]'`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
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


def evaluate(args: argparse.Namespace) -> dict:
    """Run lm-eval on the export `args.run` names; log to its MLflow run unless `--no-log`.

    Raises:
      FileNotFoundError / ValueError: no usable export, or a task lm-eval does not know.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from glam.eval.lm_harness import GlamLM
    from glam.tracking import client

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    lm = GlamLM(args.run, batch_size=args.batch_size, tracking_uri=uri)
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
    if args.no_log or lm.run_id is None:
        print("not logged to MLflow" + ("" if args.no_log else ": the export names no run"))
        return found
    store = client(uri)
    store.log_batch(lm.run_id, metrics=[_metric(k, v) for k, v in found.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"results_{'_'.join(tasks)[:100]}.json"
        path.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
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
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, "
                                               "else sqlite:///mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="print only, log nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("num_fewshot", "limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "batch_size" else 0):
            parser.error(f"--{name} must be {'positive' if name == 'batch_size' else '>= 0'}, "
                         f"got {value}")
    if args.include_path and not Path(args.include_path).is_dir():
        parser.error(f"--include_path {args.include_path}: not a folder")
    if importlib.util.find_spec("lm_eval") is None:
        print("glam-eval: lm-eval is not installed; pip install 'glam[eval]'", file=sys.stderr)
        raise SystemExit(2)
    try:
        evaluate(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"glam-eval: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
