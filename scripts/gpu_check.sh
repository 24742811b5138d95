#!/usr/bin/env bash
# One unattended GPU (or TPU) session, under 10 minutes on one H200 (stages time-limited): `glam-bench` in bfloat16
# (MFU of the dense and MoE steps; the MoE FFN with dropless on jax.lax.ragged_dot against the
# gather path), then the gpu_small study with one seed, its analysis, and the results under
# docs/results/gpu_small/ with the command, date and device.
#
# Needs glam installed with JAX's CUDA plugin beforehand (`pip install -e '.[dev]' 'jax[cuda12]'`,
# or your site's wheels). Results land in BENCHMARKS.md and docs/results/gpu_small/; a copy goes
# to $OUT when that is set (a device machine that sends back only $OUT).
set -euo pipefail
python -c 'import jax, sys; b = jax.default_backend(); print("backend:", b, jax.devices()[0].device_kind); sys.exit(b not in ("gpu", "tpu"))' \
  || { echo "gpu_check: no GPU or TPU backend; install JAX's plugin for this device" >&2; exit 2; }
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
out=docs/results/gpu_small
mkdir -p "${out}"
start=$(date -u +%FT%TZ)
status=0

finish() {  # also after a stage ran out of time: record what there is, send it back
  cat > "${out}/RUN.md" <<MSG
# gpu_small (seed 0) and the accelerator bench

- command: \`bash scripts/gpu_check.sh\` (glam-bench --experts 8,64; glam-train -m +study=gpu_small train.seed=0)
- started: ${start}; finished: $(date -u +%FT%TZ); exit status of the stages: ${status} (124: a stage ran out of its time)
- device: $(python -c 'import jax; d = jax.devices()[0]; print(jax.default_backend(), d.device_kind, len(jax.devices()), "device(s)")'); jax $(python -c 'import jax; print(jax.__version__)')
- host: $(nproc) CPU cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1 || uname -m)
- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)
- files: bench.json (the bench entry is also at the top of BENCHMARKS.md), runs.csv, figures,
  summary.txt
MSG
  if [ -n "${OUT:-}" ]; then
    cp BENCHMARKS.md "${OUT}/" 2>/dev/null || true
    tar -czf "${OUT}/gpu_small.tar.gz" "${out}" 2>/dev/null || true
  fi
  echo "results in ${out}/ and BENCHMARKS.md"
}
trap finish EXIT

# 1. The bench (E = 8 and 64 keep it short): at most 4 minutes.
timeout 240 glam-bench --experts 8,64 --json "${out}/bench.json" || status=$?

# 2. The study, seed 0 only, at most 5 minutes; then the analysis of what finished.
glam-plan +study=gpu_small train.seed=0 | tail -1
timeout 300 glam-train -m +study=gpu_small train.seed=0 || status=$?
glam-analyze --study gpu_small --out "${out}" | tee "${out}/summary.txt" || status=$?
