"""`glam-train`: train one GLaM model (dense or MoE) and log it to MLflow.

    glam-train model=cpu_dense train.steps=200
    glam-train -m model=cpu_dense,cpu_moe          # Hydra multirun, one MLflow run each
    glam-train hydra.run.dir=outputs/my_run        # rerun the same line to resume it

Metrics reach MLflow after the health check, once a finished checkpoint covers them (each
checkpoint also carries the metrics it covers that are not yet published): a rollback or a crash
never leaves points for steps that are then recomputed, nor loses points of steps that are not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from flax import nnx
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from glam import accounting, distributed
from glam.checkpoint import Checkpointer
from glam.config import CONF_DIR, Config, ConfigError, register_configs, to_config
from glam.data import WorldCorpus
from glam.eval import Evaluator, Task, read_jsonl, world_tasks
from glam.mesh import FSDP_RULES, RULES, activate, check_divisibility, data_sharding, make_mesh
from glam.optim import lr_schedule, make_optimizer
from glam.stability import HealthMonitor, TrainingDiverged, fault_scale
from glam.step import init_state, make_eval_step, make_train_step
from glam.sweep import adopt, config_hash, finished_run, sweep_context
from glam.tracking import SilentTracker, Tracker

log = logging.getLogger("glam.train")

register_configs()


def run_identity(cfg: Config, data_fingerprint: str) -> dict:
    """What a checkpoint must share with the config that resumes it: the model, the data, the
    optimisation and the step/batch/seed that fix every batch and learning rate."""
    return {"model": dataclasses.asdict(cfg.model), "optimizer": dataclasses.asdict(cfg.optimizer),
            "schedule": dataclasses.asdict(cfg.schedule),
            "train": {k: getattr(cfg.train, k) for k in ("steps", "batch_size", "seed")},
            "data_fingerprint": data_fingerprint}


class SimulatedCrash(RuntimeError):
    """Raised by `faults.crash_at_step`, standing in for a killed job."""


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CONF_DIR.parent, text=True,
                             capture_output=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_name(cfg: Config, activated_params: int) -> str:
    """E.g. `cpu_moe-1.2M-8e-s0`: preset, activated size, experts, seed."""
    m = cfg.model
    size = next(f"{activated_params / d:.3g}{u}" for d, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"),
                                                              (1e3, "K"), (1, ""))
                if activated_params >= d)
    experts = f"{m.n_experts}e" if m.family == "moe" else "dense"
    return f"{m.name}-{size}-{experts}-s{cfg.train.seed}"


def build_tasks(cfg: Config, corpus: WorldCorpus):
    e = cfg.eval
    tasks = world_tasks(corpus.world, e.max_examples, e.seed) if e.builtin else []
    for spec in e.tasks:
        examples = read_jsonl(spec.path, spec.kind)[: e.max_examples]
        train = read_jsonl(spec.train_path, spec.kind) if spec.train_path else []
        tasks.append(Task(spec.name, spec.kind, examples, train))
    return tasks


def evaluate(eval_step, model_state, corpus: WorldCorpus, cfg: Config):
    """Validation loss and perplexity, and each MoE layer's mean expert load on the val split."""
    nll, n, loads, batches = 0.0, 0.0, {}, 0
    for batch in corpus.val_batches(cfg.train.eval_batches, cfg.train.batch_size,
                                    cfg.model.seq_len + 1):
        batch_nll, batch_n, batch_loads = distributed.fetch(eval_step(model_state, batch))
        nll, n, batches = nll + float(batch_nll), n + float(batch_n), batches + 1
        for layer, load in batch_loads.items():
            loads[layer] = loads.get(layer, 0.0) + np.asarray(load)
    loss = nll / max(n, 1.0)
    expert_load = {f"layer{k}": (v / batches).tolist() for k, v in loads.items()}
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}, expert_load


class Trainer:
    """One run: state, data, checkpoints, health checks and MLflow logging. In a multi-host run
    every process holds a Trainer; only process 0 (`primary`) logs and writes files."""

    def __init__(self, cfg: Config, output_dir: Path, extra_tags: dict | None = None):
        self.cfg, self.output_dir, self.extra_tags = cfg, output_dir, extra_tags or {}
        m, t = cfg.model, cfg.train
        self.primary = distributed.is_primary()
        self.mesh = make_mesh(cfg.mesh)  # refused here, before any compilation, if impossible
        check_divisibility(self.mesh.devices.shape, m, t.batch_size)
        self.rules = FSDP_RULES if cfg.mesh.fsdp else RULES
        self.counts = accounting.count(m)
        self.tokens_per_step = t.batch_size * m.seq_len
        self.ckpt = (Checkpointer(output_dir / "checkpoints", cfg.checkpoint)
                     if cfg.checkpoint.every else None)
        latest = self.ckpt.latest_step() if self.ckpt else None
        if latest is not None and t.resume == "never":
            raise ConfigError(f"train.resume: 'never', but {self.ckpt.directory} holds checkpoints "
                              f"(newest: step {latest}); use train.resume=auto to continue them "
                              "or a new hydra.run.dir.")
        self.corpus = WorldCorpus(cfg.data)
        # Read (and check) the record before building or compiling anything.
        self.record = (self.ckpt.read_record(latest, run_identity(cfg, self.corpus.fingerprint))
                       if latest is not None else None)
        tasks = build_tasks(cfg, self.corpus)
        self.schedule = lr_schedule(cfg.schedule, t.steps)
        self.graphdef, model_graphdef, self.state, self.state_sharding = init_state(
            m, make_optimizer(cfg.optimizer, self.schedule), t.seed, self.mesh, self.rules)
        self.batch_sharding = data_sharding(self.mesh, self.rules)
        self.train_step = make_train_step(self.graphdef, m, self.schedule, self.state_sharding,
                                          self.batch_sharding)
        self.eval_step = make_eval_step(model_graphdef)
        e = cfg.eval
        self.evaluator = Evaluator(model_graphdef, self.corpus.tokenizer, tasks, seq_len=m.seq_len,
                                   batch_size=e.batch_size, shots=list(e.shots),
                                   max_answer_tokens=e.max_answer_tokens,
                                   length_normalize=e.length_normalize, seed=e.seed)
        self.predictions: list[dict] = []  # of the latest evaluation
        self.expert_load: dict = {}
        self.base_key = jax.random.key(t.seed + 1)

        self.step, self.data_order, self.rollbacks, self.skipped = 0, 0, [], 0
        self.monitor = HealthMonitor(cfg.stability)
        self.unchecked: list[tuple[int, dict]] = []  # fetched lazily from the device
        self.verified: list[tuple[int, dict]] = []  # healthy, waiting for the next checkpoint
        self.durable: list[tuple[int, dict]] = []  # covered by the newest checkpoint
        if self.record is not None:
            self._restore(latest)

    # -- checkpoints ---------------------------------------------------------------------------
    def _restore(self, step: int) -> None:
        record = self.ckpt.read_record(step, run_identity(self.cfg, self.corpus.fingerprint))
        self.state = self.ckpt.restore_state(step, self.state)
        self.step, self.data_order = record["step"], record["data_order"]
        self.rollbacks, self.skipped = record["rollbacks"], record["skipped_steps"]
        self.monitor = HealthMonitor.restore(self.cfg.stability, record["monitor"])
        # Metrics of the steps this checkpoint covers that may not have reached MLflow yet
        # (the Tracker skips any that did).
        self.durable = [(step, metrics) for step, metrics in record["unpublished_metrics"]]
        self.verified = []
        self.record = record

    def _save(self, run_id: str) -> None:
        record = {"step": self.step, "data_order": self.data_order, "rollbacks": self.rollbacks,
                  "skipped_steps": self.skipped, "monitor": self.monitor.snapshot(),
                  "unpublished_metrics": self.durable,
                  "mlflow_run_id": run_id, **run_identity(self.cfg, self.corpus.fingerprint)}
        self.ckpt.save(self.step, self.state, record)

    # -- health --------------------------------------------------------------------------------
    def _check(self) -> str | None:
        """Fetch pending step metrics; move healthy ones to `verified`; return a rollback reason."""
        for step, metrics in distributed.fetch(self.unchecked):
            reason = self.monitor.observe(step, float(metrics["lm_loss"]), bool(metrics["skipped"]))
            if reason:
                self.unchecked.clear()
                return reason
            self.skipped += int(metrics["skipped"])
            finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
            finite["skipped_steps"] = self.skipped
            finite["train_flops"] = step * self.tokens_per_step * self.counts.train_flops_per_token
            self.verified.append((step, finite))
        self.unchecked.clear()
        return None

    def _rollback(self, reason: str, tracker: Tracker | SilentTracker) -> None:
        max_rollbacks = self.cfg.stability.max_rollbacks
        at = self.step
        if self.ckpt is None or self.ckpt.latest_step() is None:
            raise TrainingDiverged(f"{reason}; no checkpoint to roll back to "
                                   "(checkpoint.every=0).")
        if len(self.rollbacks) >= max_rollbacks:
            raise TrainingDiverged(
                f"gave up after {len(self.rollbacks)} rollbacks (stability.max_rollbacks="
                f"{max_rollbacks}); last: {reason}. Lower the learning rate, check the data, "
                "or raise stability.max_rollbacks.")
        rollbacks = self.rollbacks + [{"at_step": at, "reason": reason}]
        data_order = self.data_order + 1  # new batches from here on: often enough to pass
        self.ckpt.wait()  # the newest checkpoint may still be being written
        target = self.ckpt.latest_step()
        self._restore(target)
        self.rollbacks, self.data_order = rollbacks, data_order
        tracker.set_tag(f"rollback_{len(rollbacks)}", f"at step {at} to step {target}: {reason}")
        log.warning("rollback %d: %s; back to step %d, data order %d", len(rollbacks), reason,
                    target, self.data_order)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, m, lg = self.cfg, self.cfg.model, self.cfg.logger
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))  # derived fields filled in
        config_path = self.output_dir / "config.yaml"
        if self.primary:
            config_path.write_text(OmegaConf.to_yaml(resolved))  # (Hydra writes .hydra/ on each)
        run_id = self.record["mlflow_run_id"] if self.record else None
        world = self.corpus.world
        params = {**resolved, "counts": self.counts.as_dict(),
                  "corpus": {"vocab_size": self.corpus.tokenizer.vocab_size,
                             "knowledge_bits": round(world.knowledge_bits, 1),
                             "train_tokens_per_entity": cfg.data.train_tokens / len(world.people)}}
        c = self.counts
        tags = {"model": m.name, "family": m.family, "n_experts": m.n_experts, "top_k": m.top_k,
                "total_params": c.total_params, "activated_params": c.activated_params,
                "forward_flops_per_token": c.forward_flops_per_token, "seed": cfg.train.seed,
                "git_sha": git_sha(), "data_fingerprint": self.corpus.fingerprint,
                "config_hash": config_hash(resolved), "output_dir": str(self.output_dir),
                **self.extra_tags}
        name = lg.run_name or run_name(cfg, c.activated_params)
        opened: list[Tracker] = []

        def open_run() -> str:
            opened.append(Tracker(lg.tracking_uri, lg.experiment, name, params, tags,
                                  run_id=run_id))
            return opened[0].run_id

        # Process 0 opens the MLflow run; the others learn its id (for the checkpoint record).
        shared_id = distributed.on_primary(open_run)
        tracker = opened[0] if opened else SilentTracker(shared_id)
        try:
            with tracker:
                if run_id:
                    log.info("resuming MLflow run %s from step %d", run_id, self.step)
                else:
                    log.info("MLflow run %s (%s): %s params, %s activated, %.3g forward "
                             "FLOPs/token", tracker.run_id, m.family, f"{c.total_params:,}",
                             f"{c.activated_params:,}", c.forward_flops_per_token)
                    if self.ckpt:
                        self._save(tracker.run_id)  # step 0: a rollback target always exists
                timing = self._loop(tracker)
                final = self._finish(tracker, config_path, timing)
        finally:
            if self.ckpt:
                # Also on an error: a save in flight completes (on every process, which a
                # multi-host save needs) rather than dying with the interpreter.
                self.ckpt.close()
        groups = {k: v for k, v in final.items() if k.startswith("eval/") and "_avg/" in k}
        log.info("done: val_loss %.4f, %.0f tokens/s, %s", final["val_loss"],
                 final["tokens_per_second"], ", ".join(f"{k[5:]} {v:.1f}" for k, v in groups.items()))
        return final

    def _loop(self, tracker: Tracker | SilentTracker) -> dict:
        cfg, t = self.cfg, self.cfg.train
        every = cfg.checkpoint.every
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.primary),
                   unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        compile_s, steps_timed, train_s = 0.0, 0, 0.0
        mark = time.perf_counter()
        first = True
        while self.step < t.steps:
            step = self.step
            if step == cfg.faults.crash_at_step and self.data_order == 0:
                raise SimulatedCrash(f"faults.crash_at_step={step}")
            batch = self._batch(step)
            key = jax.random.fold_in(jax.random.fold_in(self.base_key, self.data_order), step)
            scale = fault_scale(cfg.faults, step, self.data_order)
            with activate(self.mesh, self.rules):  # activation layouts, read while tracing
                self.state, metrics = self.train_step(self.state, batch, key, np.float32(scale))
            self.unchecked.append((step, metrics))
            self.step += 1
            bar.update(1)
            if first:
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                compile_s, mark, first = now - mark, now, False
            checkpoint_due = bool(every) and (self.step % every == 0 or self.step == t.steps)
            eval_due = bool(cfg.eval.every) and self.step % cfg.eval.every == 0 \
                and self.step < t.steps  # the final evaluation comes after the loop
            if self.step % t.log_every == 0 or self.step == t.steps or checkpoint_due or eval_due:
                n_new = len(self.unchecked)
                reason = self._check()
                now = time.perf_counter()
                train_s += now - mark
                steps_timed += n_new
                mark = now
                if reason:
                    self._rollback(reason, tracker)
                    bar.reset(total=t.steps)
                    bar.update(self.step)
                    continue
                last = self.verified[-1][1]
                last["tokens_per_second"] = steps_timed * self.tokens_per_step / max(train_s, 1e-9)
                if eval_due:
                    # After the health check: a rollback also discards these results.
                    self.verified.append((self.step, self._evaluate()))
                bar.set_postfix(loss=f"{last.get('lm_loss', math.nan):.3f}",
                                tok_s=f"{last['tokens_per_second']:,.0f}")
            if checkpoint_due:
                # Once wait() returns the previous save is complete and its metrics can be
                # published; this checkpoint carries its own until the next one is written.
                self.ckpt.wait()
                self._flush(tracker, self.durable)
                self.durable, self.verified = self.verified, []
                self._save(tracker.run_id)
            elif not every and len(self.verified) >= cfg.logger.flush_every:
                self._flush(tracker, self.verified)
                self.verified = []
        bar.close()
        if self.ckpt:
            self.ckpt.wait()
        self._flush(tracker, self.durable + self.verified)
        self.durable, self.verified = [], []
        return {"compile_seconds": compile_s, "train_seconds": train_s,
                "tokens_per_second": steps_timed * self.tokens_per_step / max(train_s, 1e-9)}

    def _batch(self, step: int) -> jax.Array:
        """The global batch of `step`, each process building only the rows of its devices."""
        t, window = self.cfg.train, self.cfg.model.seq_len + 1
        return jax.make_array_from_callback(
            (t.batch_size, window), self.batch_sharding,
            lambda index: self.corpus.train_batch(step, t.batch_size, window, t.seed,
                                                  self.data_order, rows=index[0]))

    @staticmethod
    def _flush(tracker: Tracker | SilentTracker, entries: list[tuple[int, dict]]) -> None:
        for step, metrics in entries:
            tracker.log_metrics(step, metrics)
        tracker.flush()

    def _evaluate(self) -> dict[str, float]:
        """Validation loss and every few-shot score of the current model; keeps the predictions
        and expert loads of the latest evaluation."""
        model_state = nnx.state(nnx.merge(self.graphdef, self.state)[0])
        val_metrics, self.expert_load = evaluate(self.eval_step, model_state, self.corpus, self.cfg)
        result = self.evaluator(model_state)
        self.predictions = result.predictions
        return {**val_metrics, **result.metrics}

    def _finish(self, tracker: Tracker | SilentTracker, config_path: Path, timing: dict) -> dict:
        t = self.cfg.train
        final = {
            **self._evaluate(), **timing,
            "train_tokens": t.steps * self.tokens_per_step,
            "train_flops_total": t.steps * self.tokens_per_step * self.counts.train_flops_per_token,
            "skipped_steps": self.skipped,
            "rollbacks": len(self.rollbacks),
        }
        tracker.log_metrics(t.steps, final)
        if self.primary:
            self._write_artifacts(tracker, config_path, final)
        if self.ckpt:
            self.ckpt.wait()
        return {**final, "run_id": tracker.run_id}

    def _write_artifacts(self, tracker: Tracker, config_path: Path, final: dict) -> None:
        artifacts = {"expert_load.json": self.expert_load, "rollbacks.json": self.rollbacks,
                     "final_metrics.json": final}
        for name, content in artifacts.items():
            (self.output_dir / name).write_text(json.dumps(content, indent=1))
        predictions = self.output_dir / "eval_predictions.jsonl"
        predictions.write_text("".join(json.dumps(p) + "\n" for p in self.predictions))
        for path in [config_path, predictions, *(self.output_dir / name for name in artifacts)]:
            tracker.log_artifact(path)


def run(cfg: Config, output_dir: str | Path, extra_tags: dict | None = None) -> dict:
    """Train per `cfg` (resuming from `output_dir`'s checkpoints), log to MLflow, return the
    final metrics and the MLflow run id."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, output_dir, extra_tags).run()


def set_aside_stale_checkpoints(output_dir: Path, hash_: str) -> None:
    """A sweep point's directory is named by its overrides, so an edited sweep config reuses it:
    checkpoints of the old config are moved aside (not deleted) and the point starts afresh."""
    marker = output_dir / "config_hash.txt"
    old = marker.read_text().strip() if marker.exists() else hash_
    if old != hash_ and (output_dir / "checkpoints").exists():
        stale = output_dir / f"checkpoints.stale-{old}"
        (output_dir / "checkpoints").rename(stale)
        log.warning("the config of this point changed: old checkpoints moved to %s", stale)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(hash_ + "\n")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(dcfg: DictConfig) -> float:
    cfg = to_config(dcfg)
    distributed.initialize(cfg.distributed)  # before anything touches a JAX backend
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    if not distributed.is_primary():
        logging.getLogger("glam").setLevel(logging.WARNING)  # process 0 reports progress
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    distributed.agree(str(output_dir.resolve()),
                      "hydra.run.dir (set it to one shared path on every process)")
    sweep = sweep_context(cfg.study.name)
    if sweep is not None:
        hash_ = config_hash(OmegaConf.to_container(OmegaConf.structured(cfg)))

        def skip_or_prepare() -> str:
            done = finished_run(cfg.logger.tracking_uri, cfg.logger.experiment, hash_)
            if done:
                adopt(cfg.logger.tracking_uri, done, sweep["tags"])
            else:
                set_aside_stale_checkpoints(output_dir, hash_)
            return done or ""

        # Process 0 alone talks to MLflow (parallel first connections race to create the schema).
        done = distributed.on_primary(skip_or_prepare)
        if done:
            log.info("sweep point %s already finished (MLflow run %s): skipped",
                     sweep["tags"]["sweep_point"], done)
            return math.nan
    final = run(cfg, output_dir, sweep["tags"] if sweep else None)
    return final["val_loss"]


if __name__ == "__main__":
    main()
