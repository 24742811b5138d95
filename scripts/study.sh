#!/usr/bin/env bash
# `make study` (study_expert_count) and `make study-data-quality` (study_data_quality): a longer
# CPU study, its analysis, and its results exported to docs/results/<study>/ with the command,
# date and machine. STUDY=<name> picks another.
set -euo pipefail
# STUDY_NAME=<name> runs it under another name (its own MLflow experiment, folder and results),
# e.g. on a second world: STUDY_NAME=<study>_world2 bash scripts/study.sh data.seed=4321 train.seed=0
study="${STUDY:-study_expert_count}"
name="${STUDY_NAME:-${study}}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
out="docs/results/${name}"
set -- "study.name=${name}" "$@"

glam-plan "+study=${study}" | tail -1
start=$(date -u +%FT%TZ)
glam-data prepare "+study=${study}" "$@"  # the text corpora the study trains on, if any
glam-train -m "+study=${study}" hydra/launcher=joblib hydra.launcher.n_jobs=2 "$@"
mkdir -p "${out}"
glam-analyze --study "${name}" --out "${out}" | tee "${out}/summary.txt"
cat > "${out}/RUN.md" <<MSG
# ${name}

- command: \`STUDY=${study} STUDY_NAME=${name} bash scripts/study.sh\` (glam-data prepare +study=${study}; glam-train -m +study=${study} hydra/launcher=joblib hydra.launcher.n_jobs=2 $*)
- started: ${start}; finished: $(date -u +%FT%TZ)
- machine: $(nproc) CPU cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1 || uname -m), $(free -g | awk '/Mem/ {print $2}') GiB; jax $(python -c 'import jax; print(jax.__version__)') on $(python -c 'import jax; print(jax.default_backend())')
- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)
- files: runs.csv (one row per run), the figures with their CSVs, summary.txt (glam-analyze output)
MSG
echo "results in ${out}/"
