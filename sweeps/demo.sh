#!/usr/bin/env bash
# `make demo`: train the CPU-scale dense and MoE presets as one Hydra multirun, logging both
# to MLflow in ./mlflow.db, then say where everything is.
set -euo pipefail
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"

glam-train -m model=cpu_dense,cpu_moe "$@"

python - <<'PY'
import os
import shutil
from mlflow.tracking import MlflowClient

uri = os.environ["MLFLOW_TRACKING_URI"]
client = MlflowClient(uri)
exp = client.get_experiment_by_name("glam")
runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=2)
print("\nDemo runs (newest first):")
def scores(metrics, group):
    return "/".join(f"{metrics.get(f'eval/{group}_avg/{k}shot', float('nan')):.1f}" for k in (0, 1, 3))


for r in runs:
    m = r.data.metrics
    print(f"  {r.info.run_name:24s} {r.info.status:8s} val_loss={m.get('val_loss', float('nan')):.3f}"
          f"  NLG 0/1/3-shot={scores(m, 'nlg')}  NLU 0/1/3-shot={scores(m, 'nlu')}"
          f"  tokens/s={m.get('tokens_per_second', 0):,.0f}")
print(f"\nMLflow database: {uri}")
print(f"Run outputs:     {os.path.abspath('outputs')}")
mlflow_bin = os.path.relpath(shutil.which("mlflow") or "mlflow")
print(f"Open the UI:     {mlflow_bin} ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
PY
