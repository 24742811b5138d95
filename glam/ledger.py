"""The publish-after-checkpoint protocol for step metrics: unchecked -> verified -> durable.

A metric point reaches MLflow only once no rollback or crash can make its step be recomputed:

- `unchecked`: recorded by the loop, still device arrays, not yet health-checked;
- `verified`: the health check passed; waiting for the next checkpoint to cover them;
- `durable`: covered by the newest checkpoint (which also carries them in its record, so a crash
  before they are published loses nothing); published once that checkpoint is known complete,
  i.e. when the next one is about to be written, or at the end.

Publishing is asynchronous (a background writer rides out tracking outages), so points handed
to the writer stay in every checkpoint record until the writer confirms them: a crash, or an
outage longer than the writer waits, never loses them. A rollback drops what is unchecked and
verified and takes the checkpoint's own unpublished points as durable. Without checkpoints nothing can be rolled back to, and verified points are
published in batches. Pure Python: no JAX, no MLflow (`publish` is any callable).
"""

from __future__ import annotations

from typing import Any, Callable

Entries = list[tuple[int, dict]]  # (step, {name: value})
# Hands entries to the writer; returns its ticket: they are stored once `confirmed` >= it.
Publish = Callable[[Entries], int]


class MetricLedger:
    """The three lists of (step, metrics) a training run holds back from MLflow."""

    def __init__(self):
        self.unchecked: list[tuple[int, Any]] = []
        self.verified: Entries = []
        self.durable: Entries = []
        self.in_flight: list[tuple[int, Entries]] = []  # (writer ticket, entries)

    def record(self, step: int, metrics: Any) -> None:
        """A step's metrics as the step returned them (device arrays allowed)."""
        self.unchecked.append((step, metrics))

    def take_unchecked(self) -> list[tuple[int, Any]]:
        """Everything unchecked, in step order; the ledger forgets it."""
        taken, self.unchecked = self.unchecked, []
        return taken

    def verify(self, step: int, metrics: dict) -> None:
        """A healthy step's host values (or an evaluation's results at `step`)."""
        self.verified.append((step, metrics))

    def restart_from(self, unpublished: Entries) -> None:
        """After restoring a checkpoint: its unpublished points become durable; everything
        newer is forgotten (it will be recomputed)."""
        self.unchecked, self.verified, self.durable = [], [], list(unpublished)
        self.in_flight = []

    def checkpoint(self, publish: Publish, confirmed: int) -> Entries:
        """Call once the previous checkpoint is complete and a new one is about to be written:
        publishes the durable points, makes the verified ones durable, and returns what the new
        checkpoint's record must carry: those, and every point handed to the writer whose
        ticket is above `confirmed` (the writer's last stored ticket)."""
        ticket = publish(self.durable)
        self.in_flight = [(t, e) for t, e in self.in_flight if t > confirmed] + \
            [(ticket, self.durable)]
        self.durable, self.verified = self.verified, []
        return [point for _, entries in self.in_flight for point in entries] + self.durable

    def publish_verified(self, publish: Publish) -> None:
        """Without checkpoints: publish the verified points now."""
        publish(self.verified)
        self.verified = []

    def publish_all(self, publish: Publish) -> None:
        """At the end of training, with the last checkpoint complete: publish everything held."""
        publish(self.durable + self.verified)
        self.durable, self.verified = [], []
