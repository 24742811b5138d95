"""The paper's stability practice on the host side: decide when to roll back, and inject faults.

The skip itself happens inside the compiled step (`glam.step`): an update whose loss or
gradients are not finite is discarded there, with no host synchronisation. The host reads the
per-step `skipped` flags and losses when it fetches metrics anyway and decides, with
`HealthMonitor`, whether to roll back to the last checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

from glam.config import FaultConfig, StabilityConfig


class TrainingDiverged(RuntimeError):
    """Rollbacks did not get past a failure; raised after `stability.max_rollbacks`."""


class HealthMonitor:
    """Consecutive skipped steps and loss spikes against a moving average of healthy losses."""

    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive_skips = 0

    def observe(self, step: int, loss: float, skipped: bool) -> Optional[str]:
        """Record one step; return the reason to roll back, or None if healthy."""
        if skipped:
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.cfg.max_consecutive_skips:
                return f"{self.consecutive_skips} consecutive non-finite steps up to step {step}"
            return None
        self.consecutive_skips = 0
        if len(self.recent) >= min(10, self.cfg.spike_window):
            mean = sum(self.recent) / len(self.recent)
            if loss > self.cfg.spike_factor * mean:
                return (f"loss spike at step {step}: {loss:.4g} > {self.cfg.spike_factor} x "
                        f"moving average {mean:.4g}")
        self.recent.append(loss)
        return None

    def snapshot(self) -> dict:
        """What a checkpoint keeps, so a resumed run decides exactly as the original would."""
        return {"recent": list(self.recent), "consecutive_skips": self.consecutive_skips}

    @classmethod
    def restore(cls, cfg: StabilityConfig, snapshot: dict) -> "HealthMonitor":
        monitor = cls(cfg)
        monitor.recent.extend(snapshot["recent"])
        monitor.consecutive_skips = snapshot["consecutive_skips"]
        return monitor


def fault_scale(cfg: FaultConfig, step: int, data_order: int) -> float:
    """Multiplier of step `step`'s loss: 1, NaN (non-finite fault) or cfg.spike_scale."""
    if data_order > 0 and not cfg.repeat_after_rollback:
        return 1.0
    if step in cfg.nonfinite_steps:
        return math.nan
    if step in cfg.spike_steps:
        return cfg.spike_scale
    return 1.0
