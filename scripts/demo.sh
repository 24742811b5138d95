#!/usr/bin/env bash
# `make demo`: the paper's three studies at CPU scale as Hydra multiruns (two parallel jobs),
# their analysis, and where everything is. MLflow: ./mlflow.db (or $MLFLOW_TRACKING_URI).
set -euo pipefail
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
launcher=(hydra/launcher=joblib hydra.launcher.n_jobs=2)

studies=(compute_vs_accuracy expert_count data_quality)

for study in "${studies[@]}"; do
  echo "== study ${study}: $(glam-plan --jobs 2 "+study=${study}" | tail -1)"
  glam-data prepare "+study=${study}" "$@"  # the text corpora a study trains on, if any
  glam-train -m "+study=${study}" "${launcher[@]}" "$@"
done
for study in "${studies[@]}"; do
  echo "== analysis of ${study}"
  glam-analyze --study "${study}" --out "outputs/analysis/${study}"
done

mlflow_bin=$(realpath --relative-to=. "$(command -v mlflow)")
cat <<MSG

Figures (PDF, PNG and the plotted data as CSV): outputs/analysis/compute_vs_accuracy/,
outputs/analysis/expert_count/ and outputs/analysis/data_quality/ (also attached to each
study's parent run in MLflow).
MLflow database: ${MLFLOW_TRACKING_URI}
Open the UI:     ${mlflow_bin} ui --backend-store-uri ${MLFLOW_TRACKING_URI}
                 then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning
                 (MLflow 3 opens its GenAI view otherwise; the "Model training" switch at the
                 top left does the same)
MSG
