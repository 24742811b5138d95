"""Run-time calibration for `glam-plan --probe`: measure what a run costs on this machine.

A probe builds a point's trainer (world or prepared corpus, tasks, initial state, evaluator)
in a child process, as `glam-train` would, and times each part of a run: imports; the trainer's
set-up and first training step cold (compiling into an empty cache) and warm (a second trainer
loading its programs from that cache); the following steps; one evaluation cold and warm; one
checkpoint. `glam-plan` turns these into a wall-time estimate per run:

    set-up + first step + (steps - 1) x step + evaluations + checkpoints

warm for every run after the first of its shape when the study shares a compilation cache
(`train.compilation_cache_dir`). `jobs` probes run at once, as a launcher with `n_jobs` parallel
runs shares the cores. Results are cached per machine and per shape (the resolved config less
seed, steps, evaluation and checkpoint intervals) in `outputs/plan/calibration.json`.

    python -m glam.study.probe OVERRIDES...   # one probe; prints its JSON
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from glam.hardware import cpu_model
from glam.resolve import ResolvedConfig, to_container

CALIBRATION = Path("outputs/plan/calibration.json")
# Fields that change how long a run takes but not what one step, evaluation or checkpoint costs.
_RUN_LENGTH = {"train": ("seed", "steps", "token_multiple", "compilation_cache_dir", "progress",
                         "resume"),
               "eval": ("every",), "checkpoint": ("every", "keep")}


@dataclass(frozen=True)
class Costs:
    """Seconds each part of a run takes on this machine, measured by one probe."""

    import_s: float  # interpreter start and imports (glam.train)
    setup_cold_s: float  # corpus, tasks, initial state (compiled), evaluator
    setup_warm_s: float  # the same with the initial state's program loaded from the cache
    first_step_cold_s: float  # first training step, compiling into an empty cache
    first_step_warm_s: float  # first training step, programs loaded from the cache
    step_s: float  # median of the following steps
    eval_cold_s: float  # first evaluation (compiles the evaluation programs)
    eval_warm_s: float  # a later evaluation
    checkpoint_s: float  # one checkpoint, written to completion

    def run_seconds(self, steps: int, eval_every: int, checkpoint_every: int,
                    cache_warm: bool) -> float:
        """Estimated wall time of a run of `steps` steps: set-up plus the MLflow run (final
        evaluation included), what a run logs as `setup_seconds` plus its MLflow duration.
        Imports are left out: a launcher's worker process pays them once for all its runs."""
        setup = self.setup_warm_s if cache_warm else self.setup_cold_s
        first = self.first_step_warm_s if cache_warm else self.first_step_cold_s
        evals = (steps - 1) // eval_every if eval_every else 0  # the final one comes on top
        saves = (1 + -(-steps // checkpoint_every)) if checkpoint_every else 0  # + step 0
        return (setup + first + (steps - 1) * self.step_s
                + (self.eval_warm_s if cache_warm else self.eval_cold_s)
                + evals * self.eval_warm_s + saves * self.checkpoint_s)


def shape_key(cfg: ResolvedConfig, jobs: int) -> str:
    """What a probe's costs depend on: the resolved config less the run-length fields, the CPU
    and how many runs share it."""
    tree = to_container(cfg)
    for section, fields in _RUN_LENGTH.items():
        for name in fields:
            tree[section].pop(name, None)
    tree["derived"].pop("filled", None)
    tree.pop("logger", None), tree.pop("study", None)
    blob = json.dumps({"config": tree, "machine": cpu_model(), "cores": os.cpu_count(),
                       "jobs": jobs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _timed(fn):
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(overrides: list[str], steps: int = 4) -> Costs:
    """Probe one point in this process (to be called in a fresh child: it measures imports and
    fixes JAX's compilation cache). Reads the point's corpus like the run; writes nothing but a
    temporary folder.

    Raises:
      ConfigError: as `glam-train` would for this point (e.g. an unprepared corpus).
    """
    import numpy as np

    from glam.resolve import load
    from glam.trainer import Trainer

    import_s = time.time() - float(os.environ.get("GLAM_PROBE_SPAWNED", time.time()))
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*overrides, "train.progress=false", f"train.compilation_cache_dir={tmp}/jax",
                     "train.resume=auto"]
        start = time.perf_counter()
        trainer = Trainer(load(overrides), Path(tmp) / "cold")
        setup_cold = time.perf_counter() - start
        cold = _timed(trainer._train_step)
        step_s = float(np.median([_timed(trainer._train_step) for _ in range(steps)]))
        eval_cold = _timed(trainer._evaluate)
        eval_warm = _timed(trainer._evaluate)
        checkpoint_s = 0.0
        if trainer.ckpt:
            checkpoint_s = _timed(lambda: (trainer._save("probe", []), trainer.ckpt.wait()))
            trainer.ckpt.close()
        # A second trainer: new jitted functions, so its programs come from the disk cache.
        start = time.perf_counter()
        warm_trainer = Trainer(load(overrides), Path(tmp) / "warm")
        setup_warm = time.perf_counter() - start
        warm = _timed(warm_trainer._train_step)
        if warm_trainer.ckpt:
            warm_trainer.ckpt.close()
    return Costs(import_s, setup_cold, setup_warm, cold, warm, step_s, eval_cold, eval_warm,
                 checkpoint_s)


def _probe_child(point: list[str]) -> Costs | str:
    """One probe in a child process: its Costs, or the last line of the error it printed."""
    env = {**os.environ, "GLAM_PROBE_SPAWNED": repr(time.time())}
    out = subprocess.run([sys.executable, "-m", "glam.study.probe", *point], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        return (out.stderr.strip().splitlines() or ["probe failed"])[-1]
    return Costs(**json.loads(out.stdout.strip().splitlines()[-1]))


def calibrate(points: dict[str, list[str]], jobs: int = 1,
              cache: Path = CALIBRATION) -> dict[str, Costs | str]:
    """Costs for every shape key in `points` (key -> one point's overrides), probing the ones
    not cached, `jobs` at a time; failed probes map to their error message (not cached)."""
    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [k for k in points if k not in known]
    if todo:
        print(f"glam-plan: probing {len(todo)} shape(s) on this machine, {jobs} at a time",
              file=sys.stderr)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for key, result in zip(todo, pool.map(lambda k: _probe_child(points[k]), todo)):
                known[key] = asdict(result) if isinstance(result, Costs) else result
    out = {k: Costs(**known[k]) if isinstance(known[k], dict) else known[k] for k in points}
    good = {k: v for k, v in known.items() if isinstance(v, dict)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(good, indent=1))
    return out


def main(argv: list[str]) -> None:
    import logging

    logging.disable(logging.INFO)
    print(json.dumps(asdict(measure(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
