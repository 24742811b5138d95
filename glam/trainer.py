"""One training run: the loop, and the collaborators it hands work to.

- `glam.data.corpus`: the run's data (batches, validation sets, tasks), world or text alike;
- `glam.step`: the pure jitted train/eval steps over NNX state;
- `glam.hooks`: what happens between steps (health check, live points, progress, evaluation,
  checkpoint), each at its own interval;
- `glam.ledger.MetricLedger`: step metrics from unchecked to verified to durable (published
  only once a finished checkpoint covers them);
- `glam.recovery.Recovery`: damaged checkpoints set aside, rollbacks to the last checkpoint
  (`glam.stability.HealthMonitor` decides when);
- `glam.checkpoint.Checkpointer`: orbax state + a JSON record (step, data order, monitor,
  unpublished metrics, run identity from `glam.identity`);
- `glam.run_logger.RunLogger`: the MLflow run (params, tags, points, artifacts).

In a multi-host run every process holds a Trainer; only process 0 logs and writes files.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from glam import accounting, compile_cache, distributed
from glam.checkpoint import Checkpointer
from glam.config import Config, QualityRole
from glam.data import corpus as corpora
from glam.data.corpus import Corpus
from glam.eval import Evaluator, Task
from glam.eval.knowledge import KnowledgeProbe, prompt_templates
from glam.hooks import default_hooks, salvage
from glam.identity import checkpoint_identity
from glam.interrupts import StopOnSignal
from glam.ledger import MetricLedger
from glam.mesh import activate, check_divisibility, data_sharding, make_mesh, rules_for
from glam.model import WEIGHTS
from glam.optim import lr_schedule, make_optimizer
from glam.recovery import Recovery, newest_step
from glam.resolve import ResolvedConfig, resolve
from glam.run_logger import RunLogger
from glam.stability import HealthMonitor, fault_scale
from glam.step import init_state, make_eval_step, make_train_step
from glam.upcycle import dense_weights, upcycled_state

log = logging.getLogger("glam.train")


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


def evaluators(cfg: ResolvedConfig, corpus: Corpus, model_graphdef, tasks: list[Task],
               counts: accounting.Counts) -> tuple[Evaluator, KnowledgeProbe | None]:
    """The few-shot evaluator of `tasks`, and the knowledge probe (`eval.knowledge_facts`, on
    a world only; None otherwise)."""
    e, m, world = cfg.eval, cfg.model, corpus.world
    evaluator = Evaluator(model_graphdef, corpus.tokenizer, tasks, seq_len=m.seq_len,
                          batch_size=e.batch_size, shots=list(e.shots),
                          max_answer_tokens=e.max_answer_tokens,
                          length_normalize=e.length_normalize, seed=e.seed)
    knowledge = (KnowledgeProbe(
        evaluator.score, world, corpus.tokenizer, seq_len=m.seq_len, batch_size=e.batch_size,
        total_params=counts.total_params, activated_params=counts.activated_params,
        max_facts=e.knowledge_facts, seed=e.seed) if world and e.knowledge_facts else None)
    return evaluator, knowledge


def export_model(logger: RunLogger, cfg: ResolvedConfig, model: nnx.Module, tokenizer) -> None:
    """Export the trained model (`RunLogger.export_model`); a failed write is only warned
    about: the training is done and in MLflow."""
    params = distributed.fetch(nnx.to_pure_dict(nnx.state(model, WEIGHTS)))  # every process
    try:
        logger.export_model(params, cfg, tokenizer)
    except OSError as err:
        log.warning("the model was not exported: %s", err)


def summary(final: dict) -> str:
    """The final line's figures: validation loss, speed, each task group's average score."""
    groups = {k: v for k, v in final.items() if k.startswith("eval/") and "_avg/" in k}
    return ", ".join([f"val_loss {final['val_loss']:.4f}",
                      f"{final['tokens_per_second']:.0f} tokens/s",
                      *(f"{k[5:]} {v:.1f}" for k, v in groups.items())])


class Trainer:
    """Builds everything a run needs (refusing bad settings before compiling anything), then
    trains, evaluates and logs it with `run()`. Its parts, `step()`, `evaluate()` and `save()`,
    serve callers that time them (`glam.study.probe`).

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
        latest = newest_step(self.ckpt, t.resume)
        self.corpus: Corpus = corpora.build(cfg)
        self.identity = checkpoint_identity(cfg, self.corpus.fingerprint)
        self.recovery = Recovery(self.ckpt, self.identity)
        # Read (and check) the newest readable record before building or compiling anything.
        self.record = self.recovery.newest_record() if latest is not None else None
        tasks = self.corpus.tasks()
        if self.corpus.world and cfg.eval.knowledge_facts:
            prompt_templates(self.corpus.world)  # one the probe cannot ask: refused right away
        compile_cache.use(t.compilation_cache_dir)  # before the first program is compiled
        self.cache_counts = compile_cache.counts()
        self.schedule = lr_schedule(cfg.schedule, t.steps)
        dense = dense_weights(cfg, self.corpus.tokenizer)  # upcycling: checked before compiling
        self.graphdef, model_graphdef, self.state, state_sharding = init_state(
            m, make_optimizer(cfg.optimizer, self.schedule), t.seed, self.mesh, self.rules)
        self.state = upcycled_state(self.state, self.graphdef, state_sharding, dense)
        self.batch_sharding = data_sharding(self.mesh, self.rules)
        self.feed = self.corpus.feed(self.batch_sharding)
        self.train_step = make_train_step(self.graphdef, m, self.schedule, state_sharding,
                                          self.batch_sharding)
        self.eval_step = make_eval_step(model_graphdef)
        self.evaluator, self.knowledge = evaluators(cfg, self.corpus, model_graphdef, tasks,
                                                    self.counts)
        self.predictions, self.expert_load = [], {}  # of the latest evaluation
        self.base_key = jax.random.key(t.seed + 1)
        self.global_step, self.data_order, self.rollbacks, self.skipped = 0, 0, [], 0
        self.monitor = HealthMonitor(cfg.stability)
        self.ledger = MetricLedger()
        self.stop = StopOnSignal()
        self.single_process = jax.process_count() == 1
        if self.record is not None and not self.recovery.restore_newest(
                lambda step: self.restore(step, with_data=True)):
            self.record = None  # every checkpoint set aside: from step 0
        self.setup_seconds = time.perf_counter() - started  # before the MLflow run starts

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
        resumed_id = self.record["mlflow_run_id"] if self.record else None
        try:
            with self.stop, RunLogger(self.cfg, c, self.corpus.facts(), self.corpus.fingerprint,
                                      self.output_dir, self.extra_tags,
                                      run_id=resumed_id) as logger:
                self.recovery.report(logger)
                if resumed_id:
                    log.info("resuming MLflow run %s from step %d", resumed_id, self.global_step)
                else:
                    log.info("MLflow run %s (%s): %s params, %s activated, %.3g forward "
                             "FLOPs/token", logger.run_id, m.family, f"{c.total_params:,}",
                             f"{c.activated_params:,}", c.forward_flops_per_token)
                    logger.attach(self.corpus.artifacts())
                    if self.ckpt:
                        self.save(logger.run_id, [])  # step 0: a rollback target always exists
                try:
                    timing = self._loop(logger)
                except BaseException:
                    salvage(self, logger)
                    raise
                final = self._finish(logger, timing)
        finally:
            if self.ckpt:
                # Also on an error: a save in flight completes (on every process, which a
                # multi-host save needs) rather than dying with the interpreter.
                self.ckpt.close()
        log.info("done: %s", summary(final))
        return final

    def _loop(self, logger: RunLogger) -> dict:
        """Steps to `train.steps`, each followed by the hooks due (`glam.hooks`, in order);
        then every checked point published. Returns the timing (`Throughput.as_dict`)."""
        self.hooks = default_hooks(self)
        self.timer = Throughput(self.tokens_per_step)
        while self.global_step < self.cfg.train.steps:
            if self.single_process:
                self.stop.check()
            self.timer.first_step(self.step())
            for hook in self.hooks:  # a rollback (False) ends the step's actions
                if hook.due(self) and hook(self, logger) is False:
                    break
        for hook in self.hooks:
            hook.close()
        if self.ckpt:
            self.ckpt.wait()
        self.ledger.publish_all(logger.publish)
        self.stop.check(shared=distributed.any_process)  # before the final evaluation
        return self.timer.as_dict()

    def step(self):
        """Train one step on the batch of (seed, data order, step); returns its device metrics
        (unfetched), recorded in the ledger as unchecked.

        Raises:
          SimulatedCrash: `faults.crash_at_step` is this step (in data order 0).
        """
        cfg, step = self.cfg, self.global_step
        if step == cfg.faults.crash_at_step and self.data_order == 0:
            raise SimulatedCrash(f"faults.crash_at_step={step}")
        key = jax.random.fold_in(jax.random.fold_in(self.base_key, self.data_order), step)
        scale = np.float32(fault_scale(cfg.faults, step, self.data_order))
        with activate(self.mesh, self.rules):  # activation layouts, read while tracing
            tokens, segment_ids = self.feed.next(step, self.data_order)
            self.state, metrics = self.train_step(self.state, tokens, key, scale, segment_ids)
        self.ledger.record(step, {**metrics, **self.feed.drawn()})
        self.global_step += 1
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Validation loss and every few-shot score of the current model (`validation`,
        `glam.eval`); keeps the predictions and expert loads of the latest evaluation."""
        model_state = nnx.state(nnx.merge(self.graphdef, self.state)[0])
        val_metrics, self.expert_load = validation(self.eval_step, model_state, self.corpus,
                                                   self.cfg)
        result = self.evaluator(model_state)
        self.predictions = result.predictions
        knowledge = self.knowledge(model_state) if self.knowledge else {}
        return {**val_metrics, **result.metrics, **knowledge}

    def save(self, run_id: str, unpublished: list) -> None:
        """Start writing the checkpoint of this step (asynchronously: `ckpt.wait()` for it),
        its record naming MLflow run `run_id` and holding the `unpublished` metric points."""
        record = {"step": self.global_step, "data_order": self.data_order,
                  "rollbacks": self.rollbacks, "skipped_steps": self.skipped,
                  "monitor": self.monitor.snapshot(), "unpublished_metrics": unpublished,
                  "mlflow_run_id": run_id, "tokens_drawn": self.feed.tokens.tolist(),
                  **self.identity}
        self.ckpt.save(self.global_step, self.state, record, self.feed.iterator_state())

    def restore(self, step: int, with_data: bool) -> None:
        """Set the run to checkpoint `step`: state, position, health monitor and the metric
        points it holds back; `with_data`, the data position too (on resuming: a rollback
        restores the model and lets the data go on).

        Raises:
          glam.checkpoint.CheckpointError: the checkpoint does not read or restore.
        """
        record = self.ckpt.read_record(step, self.identity)
        self.state = self.ckpt.restore_state(step, self.state)
        if with_data:
            self.feed.resume(self.ckpt, step, record["tokens_drawn"])
        self.global_step, self.data_order = record["step"], record["data_order"]
        self.rollbacks, self.skipped = record["rollbacks"], record["skipped_steps"]
        self.monitor = HealthMonitor.restore(self.cfg.stability, record["monitor"])
        # Points that may not have reached MLflow yet (the Tracker skips any that did).
        self.ledger.restart_from([(s, metrics) for s, metrics in record["unpublished_metrics"]])
        self.record = record

    def _finish(self, logger: RunLogger, timing: dict) -> dict:
        t = self.cfg.train
        final = {
            **self.evaluate(), **timing, "setup_seconds": self.setup_seconds,
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
            export_model(logger, self.cfg, nnx.merge(self.graphdef, self.state)[0],
                   self.corpus.tokenizer)
        logger.write_artifacts({"expert_load.json": self.expert_load,
                                "rollbacks.json": self.rollbacks, "final_metrics.json": final},
                               self.predictions)
        if self.ckpt:
            self.ckpt.wait()
        return {**final, "run_id": logger.run_id}


def run(cfg: Config, output_dir: str | Path, extra_tags: dict | None = None) -> dict:
    """Train per `cfg` (resolved here if it is raw), resuming from `output_dir`'s checkpoints;
    log to MLflow; return the final metrics and the MLflow run id.

    Raises:
      ConfigError: a bad value, an impossible mesh, a checkpoint of another config.
      glam.checkpoint.CheckpointError: two checkpoints in a row unreadable.
      glam.stability.TrainingDiverged: rollbacks did not get past a failure.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(resolve(cfg), output_dir, extra_tags).run()
