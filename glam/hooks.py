"""The periodic actions of the training loop, each a small hook with its own `every=`.

After each training step the trainer offers the step to its hooks in order; a hook that is
due runs. The order is the contract:

1. `HealthCheck` (every `train.log_every` steps, after the last, and before any action that
   needs checked metrics): verifies the pending step metrics, or rolls back and ends the step's
   actions (`glam.recovery`);
2. `LivePublish` and `Progress` report each passed check (`live/` points, a progress bar or a
   progress line);
3. `Evaluation` (every `eval.every` steps; the final one comes after the loop);
4. `Checkpoint` (every `checkpoint.every` steps and after the last: state, record and the
   metrics it covers published), or `Flush` without checkpoints.

A hook is called with the `glam.trainer.Trainer` (its state, ledger, timer) and the run's
`RunLogger`. In a multi-host run every process runs the same hooks at the same steps (their
collectives must match); only process 0 writes.
"""

from __future__ import annotations

import abc
import logging
import math
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from glam import distributed
from glam.run_logger import RunLogger
from glam.tracking import TrackingError

log = logging.getLogger("glam.train")
PROGRESS_EVERY_S = 30.0  # a progress line this often when the progress bar is off
LIVE = ("lm_loss", "loss", "learning_rate", "tokens_per_second")


class Hook(abc.ABC):
    """A periodic action: due after every `every`-th step (0: never) and, with `at_last`,
    after the last step too (without it, never after the last: the run has its own final
    action). `checked`: runs only after a health check at the same step."""

    checked = False

    def __init__(self, every: int, at_last: bool = True):
        self.every, self.at_last = every, at_last

    def due(self, trainer) -> bool:
        step, last = trainer.global_step, trainer.global_step == trainer.cfg.train.steps
        if not self.every:
            return False
        if self.at_last:
            return step % self.every == 0 or last
        return step % self.every == 0 and not last

    @abc.abstractmethod
    def __call__(self, trainer, logger: RunLogger) -> bool | None:
        """Act on the trainer's current step; False ends this step's actions."""

    def close(self) -> None:
        """After the loop."""


def check_pending(trainer) -> str | None:
    """Fetch the pending step metrics and verify the healthy ones (with `skipped_steps` and
    `train_flops`); returns the reason to roll back at the first unhealthy step, else None."""
    for step, metrics in distributed.fetch(trainer.ledger.take_unchecked()):
        reason = trainer.monitor.observe(step, float(metrics["lm_loss"]), bool(metrics["skipped"]))
        if reason:
            return reason
        trainer.skipped += int(metrics["skipped"])
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        finite["skipped_steps"] = trainer.skipped
        finite["train_flops"] = step * trainer.tokens_per_step * trainer.counts.train_flops_per_token
        trainer.ledger.verify(step, finite)
    return None


def salvage(trainer, logger: RunLogger) -> None:
    """On any failure, before the run is marked FAILED or KILLED: publish every healthy
    point held back, the unchecked ones up to (not including) the first unhealthy step.
    (A resumed run recomputes the same values for those steps, and the tracker writes no
    step twice.)"""
    try:
        check_pending(trainer)
    except Exception as err:  # e.g. the device itself failed: keep what was verified
        log.warning("could not check the last step metrics: %s", err)
    try:
        trainer.ledger.publish_all(logger.publish)
    except Exception as err:  # the original error matters more
        log.warning("could not publish the healthy metric points: %s", err)


class HealthCheck(Hook):
    """Shares the stop signal, verifies the pending metrics and times them; on a failure, rolls
    back (`glam.recovery.Recovery.rollback`) and returns False. For the reports that follow:
    `passed_at` (the step of the last passed check) and `newest_step`, `newest` (the newest
    verified step metrics, with `tokens_per_second`)."""

    def __init__(self, every: int):
        super().__init__(every)
        self.passed_at, self.newest_step, self.newest = -1, -1, {}

    def due(self, trainer) -> bool:
        return super().due(trainer) or any(h.checked and h.due(trainer) for h in trainer.hooks)

    def __call__(self, trainer, logger: RunLogger) -> bool:
        # Several processes stop together, at the same step, or one would wait forever in the
        # next step's collectives: the signal is shared at each health check.
        trainer.stop.check(shared=distributed.any_process)
        n_new = len(trainer.ledger.unchecked)
        reason = check_pending(trainer)
        tokens_per_second = trainer.timer.checked(n_new)
        if reason:
            trainer.recovery.rollback(trainer, reason, logger)
            return False
        self.passed_at = trainer.global_step
        self.newest_step, self.newest = trainer.ledger.verified[-1]
        self.newest["tokens_per_second"] = tokens_per_second
        return True


def live_points(metrics: dict) -> dict:
    """The provisional `live/` series published at every health check, so training curves show
    while a run goes: the checked metrics reach MLflow under their own names only once a
    checkpoint covers them. A rollback does not erase live points past the step it returns to
    (their series then resumes after that step); the run's `rollback_<n>` tags record it."""
    return {f"live/{k}": metrics[k] for k in LIVE if k in metrics}


class LivePublish(Hook):
    """The newest checked metrics as `live/` points, after each passed health check."""

    def __init__(self, health: HealthCheck):
        super().__init__(0)
        self.health = health

    def due(self, trainer) -> bool:
        return self.health.passed_at == trainer.global_step

    def __call__(self, trainer, logger: RunLogger) -> None:
        try:
            logger.publish([(self.health.newest_step, live_points(self.health.newest))])
        except TrackingError:
            pass  # raised again where the checked points are published


class Progress(Hook):
    """A progress bar (`train.progress`, process 0) moved every step, its loss and speed set at
    each passed health check; without the bar, process 0 logs a progress line at a passed check
    every `PROGRESS_EVERY_S` seconds and after the last step."""

    def __init__(self, trainer, health: HealthCheck):
        super().__init__(1)
        t, self.health = trainer.cfg.train, health
        self.bar = tqdm(total=t.steps, initial=trainer.global_step, unit="step",
                        dynamic_ncols=True, disable=not (t.progress and distributed.is_primary()),
                        mininterval=0.5 if sys.stderr.isatty() else 30)
        self.lines = self.bar.disable and distributed.is_primary()
        self.last_line, self.shown = time.monotonic(), trainer.global_step

    def __call__(self, trainer, logger: RunLogger) -> None:
        step, steps = trainer.global_step, trainer.cfg.train.steps
        if step <= self.shown:  # a rollback moved the run back
            self.bar.reset(total=steps)
            self.shown = 0
        self.bar.update(step - self.shown)
        self.shown = step
        if self.health.passed_at != step:
            return
        loss, tokens_per_second = (self.health.newest.get("lm_loss", math.nan),
                                   self.health.newest["tokens_per_second"])
        if self.lines and (step == steps or time.monotonic() - self.last_line >= PROGRESS_EVERY_S):
            log.info("step %d/%d (%.0f%%): loss %.4f, %s tokens/s", step, steps,
                     100 * step / steps, loss, f"{tokens_per_second:,.0f}")
            self.last_line = time.monotonic()
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")

    def close(self) -> None:
        self.bar.close()


class Evaluation(Hook):
    """Validation and task scores of the current model, verified at the step (after the health
    check: a rollback also discards them); not after the last step (the run's final evaluation
    comes after the loop)."""

    checked = True

    def __init__(self, every: int):
        super().__init__(every, at_last=False)

    def __call__(self, trainer, logger: RunLogger) -> None:
        trainer.ledger.verify(trainer.global_step, trainer.evaluate())
        trainer.timer.restart()  # evaluating is not training


class Checkpoint(Hook):
    """Waits for the previous checkpoint (complete: the metrics it covers can go out), then
    saves this step's with the checked metrics not yet published."""

    checked = True

    def __call__(self, trainer, logger: RunLogger) -> None:
        trainer.ckpt.wait()
        trainer.save(logger.run_id, trainer.ledger.checkpoint(logger.publish, logger.confirmed))
        trainer.timer.restart()  # saving is not training


class Flush(Hook):
    """Without checkpoints: publishes the checked metrics once `logger.flush_every` wait."""

    def __init__(self, flush_every: int):
        super().__init__(0)
        self.flush_every = flush_every

    def due(self, trainer) -> bool:
        return len(trainer.ledger.verified) >= self.flush_every

    def __call__(self, trainer, logger: RunLogger) -> None:
        trainer.ledger.publish_verified(logger.publish)


def default_hooks(trainer) -> list[Hook]:
    """The run's hooks, in order: health check, its reports, evaluation, checkpoint or flush."""
    cfg = trainer.cfg
    health = HealthCheck(cfg.train.log_every)
    store = (Checkpoint(cfg.checkpoint.every) if trainer.ckpt
             else Flush(cfg.logger.flush_every))
    return [health, LivePublish(health), Progress(trainer, health), Evaluation(cfg.eval.every),
            store]
