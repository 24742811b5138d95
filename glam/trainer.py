"""One training run: the loop, and the collaborators it hands work to.

- `glam.data.corpus`: the run's data (batches, validation sets, tasks), world or text alike;
- `glam.step`: the pure jitted train/eval steps over NNX state;
- `glam.ledger.MetricLedger`: step metrics from unchecked to verified to durable (published
  only once a finished checkpoint covers them);
- `glam.stability.HealthMonitor`: skips and spikes -> rollback to the last checkpoint;
- `glam.checkpoint.Checkpointer`: orbax state + a JSON record (step, data order, monitor,
  unpublished metrics, run identity from `glam.identity`);
- `glam.run_logger.RunLogger`: the MLflow run (params, tags, points, artifacts).

In a multi-host run every process holds a Trainer; only process 0 logs and writes files.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from glam import accounting, compile_cache, distributed
from glam.checkpoint import CheckpointError, Checkpointer
from glam.config import ConfigError, QualityRole, Resume
from glam.data import corpus as corpora
from glam.data.corpus import Corpus
from glam.eval import Evaluator
from glam.eval.knowledge import KnowledgeProbe, prompt_templates
from glam.identity import checkpoint_identity
from glam.interrupts import StopOnSignal
from glam.ledger import MetricLedger
from glam.mesh import activate, check_divisibility, data_sharding, make_mesh, rules_for
from glam.optim import lr_schedule, make_optimizer
from glam.resolve import ResolvedConfig
from glam.run_logger import RunLogger
from glam.tracking import TrackingError
from glam.stability import HealthMonitor, TrainingDiverged, fault_scale
from glam.step import init_state, make_eval_step, make_train_step

log = logging.getLogger("glam.train")
PROGRESS_EVERY_S = 30.0  # a progress line this often when the progress bar is off


class SimulatedCrash(RuntimeError):
    """Raised by `faults.crash_at_step`, standing in for a killed job."""


def _weighted(losses: dict[str, float], sources) -> float:
    """Mean of `losses` over `sources` (those with a loss) weighted by their mixture weights;
    the plain mean when every weight is 0."""
    weights = {s.name: s.weight for s in sources if s.name in losses}
    total = sum(weights.values())
    return (sum(losses[k] * w for k, w in weights.items()) / total if total
            else float(np.mean([losses[k] for k in weights])))


def validation(eval_step, model_state, corpus: Corpus,
               cfg: ResolvedConfig) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Validation loss (nats/token) and perplexity, and each MoE layer's mean expert load
    ([E] fractions of assignments) over `train.eval_batches` validation batches (per source for
    text: `val_loss/<source>`, and `val_loss` their mean weighted by the mixture weights; with a
    source marked `quality: web`, filtered or not, also `val_loss_clean`, the weighted mean
    over the other sources: held-out text that is the same whether or not the web was
    filtered)."""
    losses, loads, batches = {}, {}, 0
    for name, sets in corpus.validation_sets().items():
        nll, n = 0.0, 0.0
        for tokens, segments in sets:
            batch_nll, batch_n, batch_loads = distributed.fetch(
                eval_step(model_state, tokens, segments))
            nll, n, batches = nll + float(batch_nll), n + float(batch_n), batches + 1
            for layer, load in batch_loads.items():
                loads[layer] = loads.get(layer, 0.0) + np.asarray(load)
        if n:
            losses[name] = nll / n
    if "" in losses:
        loss, metrics = losses[""], {}
    else:
        loss = _weighted(losses, cfg.data.sources)
        metrics = {f"val_loss/{k}": v for k, v in losses.items()}
        clean = [s for s in cfg.data.sources if s.quality != QualityRole.web]
        if len(clean) < len(cfg.data.sources) and any(s.name in losses for s in clean):
            metrics["val_loss_clean"] = _weighted(losses, clean)
    expert_load = {f"layer{k}": (v / batches).tolist() for k, v in loads.items()}
    return ({"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), **metrics},
            expert_load)


class Throughput:
    """Compile time (to the first step's result) and training time between health checks."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.compile_s, self.train_s, self.steps = 0.0, 0.0, 0
        self.mark, self.first = time.perf_counter(), True

    def first_step(self, metrics) -> None:
        """After each step: the first one waits for its result and counts as compilation."""
        if self.first:
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            self.compile_s, self.mark, self.first = now - self.mark, now, False

    def checked(self, n_steps: int) -> float:
        """`n_steps` more steps are done; returns tokens/s over every timed step so far."""
        now = time.perf_counter()
        self.train_s, self.steps, self.mark = self.train_s + now - self.mark, self.steps + n_steps, now
        return self.tokens_per_second

    def restart(self) -> None:
        """What came since the last check was not training (an evaluation, a checkpoint): the
        clock starts again from now."""
        self.mark = time.perf_counter()

    @property
    def tokens_per_second(self) -> float:
        return self.steps * self.tokens_per_step / max(self.train_s, 1e-9)

    def as_dict(self) -> dict:
        """compile_seconds and train_seconds (s), tokens_per_second (tokens/s)."""
        return {"compile_seconds": self.compile_s, "train_seconds": self.train_s,
                "tokens_per_second": self.tokens_per_second}


class Trainer:
    """Builds everything a run needs (refusing bad settings before compiling anything), then
    trains, evaluates and logs it with `run()`.

    Raises (on construction):
      ConfigError: an impossible mesh, `train.resume=never` over checkpoints, or a checkpoint
        written for another config.
      glam.checkpoint.CheckpointError: two checkpoints in a row cannot be read (one damaged
        newest checkpoint is set aside and the previous one used).
    """

    def __init__(self, cfg: ResolvedConfig, output_dir: Path, extra_tags: dict | None = None):
        started = time.perf_counter()
        self.cfg, self.output_dir, self.extra_tags = cfg, output_dir, extra_tags or {}
        m, t = cfg.model, cfg.train
        self.mesh = make_mesh(cfg.mesh)  # refused here, before any compilation, if impossible
        check_divisibility(self.mesh.devices.shape, m, t.batch_size)
        self.rules = rules_for(cfg.mesh)
        self.counts = accounting.count(m)
        self.tokens_per_step = t.batch_size * m.seq_len
        self.ckpt = (Checkpointer(output_dir / "checkpoints", cfg.checkpoint)
                     if cfg.checkpoint.every else None)
        latest = self.ckpt.latest_step() if self.ckpt else None
        if latest is not None and t.resume == Resume.never:
            raise ConfigError(f"train.resume: 'never', but {self.ckpt.directory} holds checkpoints "
                              f"(newest: step {latest}); use train.resume=auto to continue them "
                              "or a new hydra.run.dir.")
        self.corpus: Corpus = corpora.build(cfg)
        self.identity = checkpoint_identity(cfg, self.corpus.fingerprint)
        self.set_aside: list[str] = []  # damaged checkpoints moved away, reported on the run
        self.reported_set_aside = 0
        # Read (and check) the newest readable record before building or compiling anything.
        self.record = self._newest_record() if latest is not None else None
        tasks = self.corpus.tasks()
        world = self.corpus.world
        if world and cfg.eval.knowledge_facts:
            prompt_templates(world)  # a world the probe cannot ask: refused before compiling
        compile_cache.use(t.compilation_cache_dir)  # before the first program is compiled
        self.cache_counts = compile_cache.counts()
        self.schedule = lr_schedule(cfg.schedule, t.steps)
        self.graphdef, model_graphdef, self.state, state_sharding = init_state(
            m, make_optimizer(cfg.optimizer, self.schedule), t.seed, self.mesh, self.rules)
        self.batch_sharding = data_sharding(self.mesh, self.rules)
        self.feed = self.corpus.feed(self.batch_sharding)
        self.train_step = make_train_step(self.graphdef, m, self.schedule, state_sharding,
                                          self.batch_sharding)
        self.eval_step = make_eval_step(model_graphdef)
        e = cfg.eval
        self.evaluator = Evaluator(model_graphdef, self.corpus.tokenizer, tasks, seq_len=m.seq_len,
                                   batch_size=e.batch_size, shots=list(e.shots),
                                   max_answer_tokens=e.max_answer_tokens,
                                   length_normalize=e.length_normalize, seed=e.seed)
        self.knowledge = (KnowledgeProbe(
            self.evaluator.score, world, self.corpus.tokenizer, seq_len=m.seq_len,
            batch_size=e.batch_size, total_params=self.counts.total_params,
            activated_params=self.counts.activated_params, max_facts=e.knowledge_facts,
            seed=e.seed) if world and e.knowledge_facts else None)
        self.predictions: list[dict] = []  # of the latest evaluation
        self.expert_load: dict = {}
        self.base_key = jax.random.key(t.seed + 1)
        self.step, self.data_order, self.rollbacks, self.skipped = 0, 0, [], 0
        self.monitor = HealthMonitor(cfg.stability)
        self.ledger = MetricLedger()
        self.stop = StopOnSignal()
        self.single_process = jax.process_count() == 1
        if self.record is not None:
            self._restore_newest(with_data=True)
        self.setup_seconds = time.perf_counter() - started  # before the MLflow run starts

    # -- checkpoints ---------------------------------------------------------------------------
    def _set_aside(self, step: int, err: Exception) -> None:
        where = self.ckpt.set_aside(step)
        note = f"checkpoint {step} unreadable ({str(err).splitlines()[0][:300]}); moved to {where}"
        self.set_aside.append(note)
        log.warning("%s; resuming from the previous checkpoint", note)

    def _report_set_aside(self, logger: RunLogger) -> None:
        """Tag the run with every checkpoint set aside that it does not show yet."""
        for i in range(self.reported_set_aside, len(self.set_aside)):
            logger.set_tag(f"checkpoint_set_aside_{i + 1}", self.set_aside[i])
        self.reported_set_aside = len(self.set_aside)

    def _newest_record(self) -> dict | None:
        """The record of the newest checkpoint, or of the one before when the newest is
        unreadable (set aside: GLaM's practice is to restart from the last healthy checkpoint).

        Raises:
          CheckpointError: two checkpoints in a row are unreadable; that is no longer a damaged
            file but a fault to look at (only the newest was set aside).
        """
        return self._with_one_set_aside(lambda step: self.ckpt.read_record(step, self.identity))

    def _restore_newest(self, with_data: bool = False) -> None:
        """Restore the newest checkpoint, or the one before when the newest does not restore
        (set aside); with none left the run starts from step 0 (its initial state).
        `with_data`: the data position too (on resuming; a rollback restores the model and
        lets the data go on).

        Raises:
          CheckpointError: two checkpoints in a row do not restore.
        """
        if self._with_one_set_aside(lambda step: self._restore(step, with_data)) is None:
            self.record = None

    def _with_one_set_aside(self, use):
        damaged = None
        while (step := self.ckpt.latest_step()) is not None:
            try:
                return use(step) or True
            except CheckpointError as err:
                if damaged is not None:
                    raise CheckpointError(f"{err}; the checkpoint after it was unreadable too "
                                          f"(set aside: {damaged}). Look at the storage before "
                                          "resuming.") from err
                self._set_aside(step, err)
                damaged = step
        return None

    def _restore(self, step: int, with_data: bool) -> None:
        record = self.ckpt.read_record(step, self.identity)
        self.state = self.ckpt.restore_state(step, self.state)
        if with_data:
            self.feed.resume(self.ckpt, step, record["tokens_drawn"])
        self.step, self.data_order = record["step"], record["data_order"]
        self.rollbacks, self.skipped = record["rollbacks"], record["skipped_steps"]
        self.monitor = HealthMonitor.restore(self.cfg.stability, record["monitor"])
        # Points this checkpoint covers that may not have reached MLflow yet (the Tracker skips
        # any that did).
        self.ledger.restart_from([(s, metrics) for s, metrics in record["unpublished_metrics"]])
        self.record = record

    def _save(self, run_id: str, unpublished: list) -> None:
        record = {"step": self.step, "data_order": self.data_order, "rollbacks": self.rollbacks,
                  "skipped_steps": self.skipped, "monitor": self.monitor.snapshot(),
                  "unpublished_metrics": unpublished, "mlflow_run_id": run_id,
                  "tokens_drawn": self.feed.tokens.tolist(),
                  **self.identity}
        self.ckpt.save(self.step, self.state, record, self.feed.iterator_state())

    # -- health --------------------------------------------------------------------------------
    def _check(self) -> str | None:
        """Fetch pending step metrics; verify healthy ones; return a rollback reason."""
        for step, metrics in distributed.fetch(self.ledger.take_unchecked()):
            reason = self.monitor.observe(step, float(metrics["lm_loss"]), bool(metrics["skipped"]))
            if reason:
                return reason
            self.skipped += int(metrics["skipped"])
            finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
            finite["skipped_steps"] = self.skipped
            finite["train_flops"] = step * self.tokens_per_step * self.counts.train_flops_per_token
            self.ledger.verify(step, finite)
        return None

    def _rollback(self, reason: str, logger: RunLogger) -> None:
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
        self._restore_newest()
        self._report_set_aside(logger)
        if self.record is None:
            raise TrainingDiverged(f"{reason}; every checkpoint to roll back to was unreadable "
                                   f"(set aside: {'; '.join(self.set_aside)}).")
        target = self.step
        self.rollbacks, self.data_order = rollbacks, data_order
        logger.set_tag(f"rollback_{len(rollbacks)}", f"at step {at} to step {target}: {reason}")
        log.warning("rollback %d: %s; back to step %d, data order %d", len(rollbacks), reason,
                    target, self.data_order)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to `train.steps` (from the newest checkpoint, if any), evaluate, log; returns
        the final metrics and the MLflow run id. On an error the MLflow run ends FAILED (KILLED
        on SIGTERM or SIGINT, noted and raised between steps) and the error passes on.

        Raises:
          glam.interrupts.Interrupted: a stop signal arrived.
          TrainingDiverged: rollbacks did not get past a failure.
          SimulatedCrash: `faults.crash_at_step` was reached.
        """
        m, c = self.cfg.model, self.counts
        facts = self.corpus.facts()
        resumed_id = self.record["mlflow_run_id"] if self.record else None
        try:
            with self.stop, RunLogger(self.cfg, c, facts, self.corpus.fingerprint, self.output_dir,
                           self.extra_tags, run_id=resumed_id) as logger:
                self._report_set_aside(logger)
                if resumed_id:
                    log.info("resuming MLflow run %s from step %d", resumed_id, self.step)
                else:
                    log.info("MLflow run %s (%s): %s params, %s activated, %.3g forward "
                             "FLOPs/token", logger.run_id, m.family, f"{c.total_params:,}",
                             f"{c.activated_params:,}", c.forward_flops_per_token)
                    logger.attach(self.corpus.artifacts())
                    if self.ckpt:
                        self._save(logger.run_id, [])  # step 0: a rollback target always exists
                try:
                    timing = self._loop(logger)
                except BaseException:
                    self._salvage(logger)
                    raise
                final = self._finish(logger, timing)
        finally:
            if self.ckpt:
                # Also on an error: a save in flight completes (on every process, which a
                # multi-host save needs) rather than dying with the interpreter.
                self.ckpt.close()
        groups = {k: v for k, v in final.items() if k.startswith("eval/") and "_avg/" in k}
        log.info("done: %s", ", ".join([f"val_loss {final['val_loss']:.4f}",
                                         f"{final['tokens_per_second']:.0f} tokens/s",
                                         *(f"{k[5:]} {v:.1f}" for k, v in groups.items())]))
        return final

    def _loop(self, logger: RunLogger) -> dict:
        cfg, t, every = self.cfg, self.cfg.train, self.cfg.checkpoint.every
        bar = tqdm(total=t.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (t.progress and distributed.is_primary()),
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        timer = Throughput(self.tokens_per_step)
        lines = bar.disable and distributed.is_primary()
        last_line = time.monotonic()
        while self.step < t.steps:
            if self.single_process:
                self.stop.check()
            metrics = self._train_step()
            timer.first_step(metrics)
            bar.update(1)
            last = self.step == t.steps
            checkpoint_due = bool(every) and (self.step % every == 0 or last)
            # (the final evaluation comes after the loop)
            eval_due = bool(cfg.eval.every) and self.step % cfg.eval.every == 0 and not last
            if self.step % t.log_every == 0 or last or checkpoint_due or eval_due:
                # Several processes stop together, at the same step, or one would wait forever
                # in the next step's collectives: the signal is shared at each health check.
                self.stop.check(shared=distributed.any_process)
                n_new = len(self.ledger.unchecked)
                reason = self._check()
                tokens_per_second = timer.checked(n_new)
                if reason:
                    self._rollback(reason, logger)
                    bar.reset(total=t.steps)
                    bar.update(self.step)
                    continue
                newest_step, newest = self.ledger.verified[-1]
                newest["tokens_per_second"] = tokens_per_second
                try:
                    logger.publish([(newest_step, live_points(newest))])
                except TrackingError:
                    pass  # raised again where the checked points are published
                if lines and (last or time.monotonic() - last_line >= PROGRESS_EVERY_S):
                    log.info("step %d/%d (%.0f%%): loss %.4f, %s tokens/s", self.step, t.steps,
                             100 * self.step / t.steps, newest.get("lm_loss", math.nan),
                             f"{tokens_per_second:,.0f}")
                    last_line = time.monotonic()
                if eval_due:  # after the health check: a rollback also discards these results
                    self.ledger.verify(self.step, self._evaluate())
                bar.set_postfix(loss=f"{newest.get('lm_loss', math.nan):.3f}",
                                tok_s=f"{tokens_per_second:,.0f}")
            if checkpoint_due:
                self.ckpt.wait()  # the previous checkpoint is complete: its points can go out
                self._save(logger.run_id,
                           self.ledger.checkpoint(logger.publish, logger.confirmed))
            elif not every and len(self.ledger.verified) >= cfg.logger.flush_every:
                self.ledger.publish_verified(logger.publish)
            if eval_due or checkpoint_due:
                timer.restart()
        bar.close()
        if self.ckpt:
            self.ckpt.wait()
        self.ledger.publish_all(logger.publish)
        self.stop.check(shared=distributed.any_process)  # before the final evaluation
        return timer.as_dict()

    def _salvage(self, logger: RunLogger) -> None:
        """On any failure, before the run is marked FAILED or KILLED: publish every healthy
        point held back, the unchecked ones up to (not including) the first unhealthy step.
        (A resumed run recomputes the same values for those steps, and the tracker writes no
        step twice.)"""
        try:
            self._check()
        except Exception as err:  # e.g. the device itself failed: keep what was verified
            log.warning("could not check the last step metrics: %s", err)
        try:
            self.ledger.publish_all(logger.publish)
        except Exception as err:  # the original error matters more
            log.warning("could not publish the healthy metric points: %s", err)

    def _train_step(self):
        """Run one step on the batch of (seed, data order, step); returns its device metrics."""
        cfg, step = self.cfg, self.step
        if step == cfg.faults.crash_at_step and self.data_order == 0:
            raise SimulatedCrash(f"faults.crash_at_step={step}")
        key = jax.random.fold_in(jax.random.fold_in(self.base_key, self.data_order), step)
        scale = np.float32(fault_scale(cfg.faults, step, self.data_order))
        with activate(self.mesh, self.rules):  # activation layouts, read while tracing
            tokens, segment_ids = self.feed.next(step, self.data_order)
            self.state, metrics = self.train_step(self.state, tokens, key, scale, segment_ids)
        self.ledger.record(step, {**metrics, **self.feed.drawn()})
        self.step += 1
        return metrics

    def _evaluate(self) -> dict[str, float]:
        """Validation loss and every few-shot score of the current model; keeps the predictions
        and expert loads of the latest evaluation."""
        model_state = nnx.state(nnx.merge(self.graphdef, self.state)[0])
        val_metrics, self.expert_load = validation(self.eval_step, model_state, self.corpus,
                                                   self.cfg)
        result = self.evaluator(model_state)
        self.predictions = result.predictions
        knowledge = self.knowledge(model_state) if self.knowledge else {}
        return {**val_metrics, **result.metrics, **knowledge}

    def _finish(self, logger: RunLogger, timing: dict) -> dict:
        t = self.cfg.train
        final = {
            **self._evaluate(), **timing, "setup_seconds": self.setup_seconds,
            "train_tokens": t.steps * self.tokens_per_step,
            "train_flops_total": t.steps * self.tokens_per_step * self.counts.train_flops_per_token,
            "skipped_steps": self.skipped,
            "rollbacks": len(self.rollbacks),
            # programs loaded from / compiled into train.compilation_cache_dir by this run
            **{f"compile_cache_{k}": n - self.cache_counts[k]
               for k, n in compile_cache.counts().items()},
        }
        logger.publish([(t.steps, final)])
        if self.cfg.logger.export:
            model = nnx.merge(self.graphdef, self.state)[0]
            params = distributed.fetch(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # all
            try:
                logger.export_model(params, self.cfg, self.corpus.tokenizer)
            except OSError as err:  # the training is done and in MLflow: warn, don't fail
                log.warning("the model was not exported: %s", err)
        logger.write_artifacts({"expert_load.json": self.expert_load,
                                "rollbacks.json": self.rollbacks, "final_metrics.json": final},
                               self.predictions)
        if self.ckpt:
            self.ckpt.wait()
        return {**final, "run_id": logger.run_id}


LIVE = ("lm_loss", "loss", "learning_rate", "tokens_per_second")


def live_points(metrics: dict) -> dict:
    """The provisional `live/` series published at every health check, so training curves show
    while a run goes: the checked metrics reach MLflow under their own names only once a
    checkpoint covers them. A rollback does not erase live points past the step it returns to
    (their series then resumes after that step); the run's `rollback_<n>` tags record it."""
    return {f"live/{k}": metrics[k] for k in LIVE if k in metrics}

