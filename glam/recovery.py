"""Getting a run past a failure: damaged checkpoints set aside, and rollbacks.

GLaM's practice: a damaged newest checkpoint is moved away and the run restarts from the one
before; a step that fails the health check (`glam.stability.HealthMonitor`) sends the model
back to the newest checkpoint while the data goes on in a new order (`data_order` + 1).
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from glam.checkpoint import CheckpointError, Checkpointer
from glam.config import ConfigError, Resume
from glam.run_logger import RunLogger
from glam.stability import TrainingDiverged

log = logging.getLogger("glam.train")
T = TypeVar("T")


def newest_step(ckpt: Checkpointer | None, resume: Resume) -> int | None:
    """The step of the newest checkpoint to resume from (None: none, or no checkpointer).

    Raises:
      ConfigError: `train.resume=never` and there are checkpoints.
    """
    latest = ckpt.latest_step() if ckpt else None
    if latest is not None and resume == Resume.never:
        raise ConfigError(f"train.resume: 'never', but {ckpt.directory} holds checkpoints "
                          f"(newest: step {latest}); use train.resume=auto to continue them "
                          "or a new hydra.run.dir.")
    return latest


class Recovery:
    """The checkpoints of one run seen as rollback and resume targets; `set_aside` notes each
    damaged checkpoint moved away (reported on the MLflow run as `checkpoint_set_aside_<n>`)."""

    def __init__(self, ckpt: Checkpointer | None, identity: dict):
        self.ckpt, self.identity = ckpt, identity
        self.set_aside: list[str] = []
        self.reported = 0

    def newest_record(self) -> dict | None:
        """The record of the newest checkpoint, or of the one before when the newest is
        unreadable (set aside); None when there is none.

        Raises:
          CheckpointError: two checkpoints in a row are unreadable; that is no longer a damaged
            file but a fault to look at (only the newest was set aside).
        """
        return self._with_one_set_aside(lambda step: self.ckpt.read_record(step, self.identity))

    def restore_newest(self, restore: Callable[[int], None]) -> bool:
        """`restore(step)` the newest checkpoint, or the one before when the newest does not
        restore (set aside); False when none is left.

        Raises:
          CheckpointError: two checkpoints in a row do not restore.
        """
        return self._with_one_set_aside(lambda step: restore(step) or True) is not None

    def _with_one_set_aside(self, use: Callable[[int], T]) -> T | None:
        damaged = None
        while (step := self.ckpt.latest_step()) is not None:
            try:
                return use(step)
            except CheckpointError as err:
                if damaged is not None:
                    raise CheckpointError(f"{err}; the checkpoint after it was unreadable too "
                                          f"(set aside: {damaged}). Look at the storage before "
                                          "resuming.") from err
                where = self.ckpt.set_aside(step)
                note = (f"checkpoint {step} unreadable ({str(err).splitlines()[0][:300]}); "
                        f"moved to {where}")
                self.set_aside.append(note)
                log.warning("%s; resuming from the previous checkpoint", note)
                damaged = step
        return None

    def report(self, logger: RunLogger) -> None:
        """Tag the run with every checkpoint set aside that it does not show yet."""
        for i in range(self.reported, len(self.set_aside)):
            logger.set_tag(f"checkpoint_set_aside_{i + 1}", self.set_aside[i])
        self.reported = len(self.set_aside)

    def rollback(self, trainer, reason: str, logger: RunLogger) -> None:
        """Send `trainer` back to its newest restorable checkpoint (model, optimizer, monitor;
        the data goes on in the next data order), tagged on the run as `rollback_<n>`.

        Raises:
          TrainingDiverged: no checkpoint to go back to (none written, or none readable), or
            `stability.max_rollbacks` reached.
        """
        max_rollbacks, at = trainer.cfg.stability.max_rollbacks, trainer.global_step
        if self.ckpt is None or self.ckpt.latest_step() is None:
            raise TrainingDiverged(f"{reason}; no checkpoint to roll back to "
                                   "(checkpoint.every=0).")
        if len(trainer.rollbacks) >= max_rollbacks:
            raise TrainingDiverged(
                f"gave up after {len(trainer.rollbacks)} rollbacks (stability.max_rollbacks="
                f"{max_rollbacks}); last: {reason}. Lower the learning rate, check the data, "
                "or raise stability.max_rollbacks.")
        rollbacks = trainer.rollbacks + [{"at_step": at, "reason": reason}]
        data_order = trainer.data_order + 1  # new batches from here on: often enough to pass
        self.ckpt.wait()  # the newest checkpoint may still be being written
        restored = self.restore_newest(lambda step: trainer.restore(step, with_data=False))
        self.report(logger)
        if not restored:
            raise TrainingDiverged(f"{reason}; every checkpoint to roll back to was unreadable "
                                   f"(set aside: {'; '.join(self.set_aside)}).")
        target = trainer.global_step
        trainer.rollbacks, trainer.data_order = rollbacks, data_order
        logger.set_tag(f"rollback_{len(rollbacks)}", f"at step {at} to step {target}: {reason}")
        log.warning("rollback %d: %s; back to step %d, data order %d", len(rollbacks), reason,
                    target, data_order)
