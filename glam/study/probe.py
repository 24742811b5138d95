"""Run-time calibration for `glam-plan --probe`: measure what a run costs on this machine.

A probe builds a point's trainer (world or prepared corpus, tasks, initial state, evaluator)
in a child process, as `glam-train` would, and times each part of a run: the trainer's set-up and first training step cold (compiling into an empty cache) and warm (a
second trainer loading its programs from that cache); the following steps; one evaluation
cold, from the cache and warm; one checkpoint. `glam-plan` turns these into a wall-time
estimate per run:

    set-up + first step + (steps - 1) x step + evaluations + checkpoints

warm when an earlier point compiled the same programs into the compilation cache the study
shares (`train.compilation_cache_dir`). With `jobs` > 1, that many copies of a probe run side
by side and their costs are averaged, as a launcher's `n_jobs` parallel runs share the cores;
`schedule` then runs the points in order on that many workers, the last ones faster by
`alone_speedup` as fewer share the machine. Results are cached per machine and per shape (the
resolved config less the seed and the evaluation and checkpoint intervals) in
`outputs/plan/calibration.json`, the speed-up in `outputs/plan/speedup.json`.

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
from dataclasses import asdict, astuple, dataclass, fields
from importlib.metadata import version
from pathlib import Path

from glam.hardware import cpu_model
from glam.resolve import ResolvedConfig, to_container

CALIBRATION = Path("outputs/plan/calibration.json")
PROBE_TIMEOUT_S = 600
# Fields that change how long a run takes but not what one step, evaluation or checkpoint costs.
# (train.steps stays: the learning-rate schedule is compiled into the training step.)
_RUN_LENGTH = {"train": ("seed", "compilation_cache_dir", "progress", "resume"),
               "eval": ("every",), "checkpoint": ("every", "keep")}


@dataclass(frozen=True)
class Costs:
    """Seconds each part of a run takes on this machine, measured by one probe."""

    setup_cold_s: float  # corpus, tasks, initial state (compiled), evaluator
    setup_warm_s: float  # the same with the initial state's program loaded from the cache
    first_step_cold_s: float  # first training step, compiling into an empty cache
    first_step_warm_s: float  # first training step, programs loaded from the cache
    step_s: float  # mean of the following steps (at least 3 s of them)
    eval_cold_s: float  # first evaluation, compiling its programs
    eval_cached_s: float  # first evaluation, its programs loaded from the cache
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
                + (self.eval_cached_s if cache_warm else self.eval_cold_s)
                + evals * self.eval_warm_s + saves * self.checkpoint_s)


def _machine() -> dict:
    """What every measurement here depends on besides the config."""
    return {"machine": cpu_model(), "cores": os.cpu_count(), "glam": version("glam"),
            "jax": version("jax")}


def _digest(tree) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config(cfg: ResolvedConfig, drop: tuple[str, ...]) -> dict:
    """The resolved config as a tree, less the run-length fields and the sections `drop`."""
    tree = to_container(cfg)
    for section, names in _RUN_LENGTH.items():
        for name in names:
            tree[section].pop(name, None)
    for section in drop:
        tree.pop(section, None)
    tree["derived"].pop("filled", None)
    return tree


def shape_key(cfg: ResolvedConfig, jobs: int) -> str:
    """What a probe's costs depend on: the resolved config less seed and intervals, the CPU,
    how many runs share it, and the glam and JAX versions (the backend follows from the config's
    resolved dispatch and the machine)."""
    return _digest({"config": _config(cfg, ("logger", "study")), "jobs": jobs,
                    "fields": [f.name for f in fields(Costs)], **_machine()})


def program_key(cfg: ResolvedConfig) -> str:
    """What a run's compiled programs depend on: the resolved config less the data section (two
    corpora of one vocabulary size train the same programs), seed and intervals."""
    return _digest(_config(cfg, ("data", "logger", "study")))


def _timed(fn):
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(overrides: list[str], min_steps: int = 5, step_seconds: float = 3.0) -> Costs:
    """Probe one point in this process (to be called in a fresh child: it fixes JAX's
    compilation cache). Reads the point's corpus like the run; writes nothing but a
    temporary folder.

    Raises:
      ConfigError: as `glam-train` would for this point (e.g. an unprepared corpus).
    """
    import jax

    from glam.resolve import load
    from glam.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        # A checkpointer whatever the point says: its save is timed (the key ignores intervals).
        overrides = [*overrides, "train.progress=false", f"train.compilation_cache_dir={tmp}/jax",
                     "train.resume=auto", f"checkpoint.every={2**31 - 1}"]
        start = time.perf_counter()
        trainer = Trainer(load(overrides), Path(tmp) / "cold")
        setup_cold = time.perf_counter() - start
        cold = _timed(trainer.step)
        # Steps for `step_seconds` at least: one step varies with what the other jobs do.
        n, start = 0, time.perf_counter()
        while n < min_steps or time.perf_counter() - start < step_seconds:
            metrics = trainer.step()
            n += 1
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / n
        eval_cold = _timed(trainer.evaluate)
        eval_warm = _timed(trainer.evaluate)
        checkpoint_s = _timed(lambda: (trainer.save("probe", []), trainer.ckpt.wait()))
        trainer.ckpt.close()
        # A second trainer: new jitted functions, so its programs come from the disk cache.
        start = time.perf_counter()
        warm_trainer = Trainer(load(overrides), Path(tmp) / "warm")
        setup_warm = time.perf_counter() - start
        warm = _timed(warm_trainer.step)
        eval_cached = _timed(warm_trainer.evaluate)
        warm_trainer.ckpt.close()
    return Costs(setup_cold, setup_warm, cold, warm, step_s, eval_cold, eval_cached,
                 eval_warm, checkpoint_s)


def _probe_child(point: list[str]) -> Costs | str:
    """One probe in a child process: its Costs, or the last line of the error it printed."""
    try:
        out = subprocess.run([sys.executable, "-m", "glam.study.probe", *point],
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the probe took over {PROBE_TIMEOUT_S} s"
    if out.returncode:
        return (out.stderr.strip().splitlines() or ["probe failed"])[-1]
    try:
        return Costs(**json.loads(out.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError) as err:
        return f"unreadable probe output ({err})"


def _read(cache: Path) -> dict[str, Costs]:
    """The cached costs; an unreadable file or entry (older fields, damage) counts as missing."""
    try:
        raw = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        try:
            out[key] = Costs(**value)
        except TypeError:
            pass
    return out


def calibrate(points: dict[str, list[str]], jobs: int = 1,
              cache: Path = CALIBRATION) -> dict[str, Costs | str]:
    """Costs for every shape key in `points` (key -> one point's overrides), probing the ones
    not cached; failed probes map to their error message (not cached). Each shape is probed by
    `jobs` identical children side by side, whose costs are averaged: the runs of a launcher
    with `n_jobs` parallel jobs share the machine the same way."""
    known, failed = _read(cache), {}
    todo = [k for k in points if k not in known]
    if todo:
        print(f"glam-plan: probing {len(todo)} shape(s) on this machine, {jobs} copies at a time",
              file=sys.stderr)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for key in todo:  # `jobs` copies side by side: the machine shared as by the runs
                results = list(pool.map(lambda _: _probe_child(points[key]), range(jobs)))
                good = [r for r in results if isinstance(r, Costs)]
                if len(good) == jobs:
                    known[key] = Costs(*(sum(v) / jobs for v in zip(*(astuple(r) for r in good))))
                else:
                    failed[key] = next(r for r in results if not isinstance(r, Costs))
        cache.parent.mkdir(parents=True, exist_ok=True)
        part = cache.with_suffix(".part")
        part.write_text(json.dumps({k: asdict(v) for k, v in known.items()}, indent=1))
        os.replace(part, cache)  # whole or not at all
    return {k: known.get(k, failed.get(k)) for k in points}


def alone_speedup(point: list[str], contended: Costs, jobs: int,
                  cache: Path = CALIBRATION) -> float:
    """How much faster a step runs alone than beside `jobs - 1` others (1.0 for one job):
    one more probe of `point` alone, against its costs measured side by side; cached per
    machine beside the costs. A launcher's last runs run with fewer neighbours."""
    if jobs == 1:
        return 1.0
    path = cache.with_name("speedup.json")
    key = _digest({"jobs": jobs, **_machine()})
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known.get(key), (int, float)):
        alone = _probe_child(point)
        if not isinstance(alone, Costs):
            return 1.0
        known[key] = max(1.0, contended.step_s / alone.step_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known))
    return float(known[key])


def schedule(seconds: list[float], jobs: int, speedup: float) -> tuple[list[float], float]:
    """Wall time of each run, and of all, when `jobs` workers take the runs in order (as Hydra's
    joblib launcher does) and each run needs `seconds` while all workers are busy. With k < jobs
    runs left, each progresses speedup ** ((jobs - k) / (jobs - 1)) times faster (speedup when
    alone)."""
    start, left, walls = {}, {}, [0.0] * len(seconds)
    queue, now = list(range(len(seconds))), 0.0
    while queue or left:
        while queue and len(left) < jobs:
            i = queue.pop(0)
            start[i], left[i] = now, seconds[i]
        rate = speedup ** ((jobs - len(left)) / (jobs - 1)) if jobs > 1 else 1.0
        i = min(left, key=left.get)
        step = left[i] / rate
        now += step
        for j in left:
            left[j] -= step * rate
        walls[i] = now - start[i]
        del left[i]
    return walls, now


def main(argv: list[str]) -> None:
    import logging

    logging.disable(logging.INFO)
    print(json.dumps(asdict(measure(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
