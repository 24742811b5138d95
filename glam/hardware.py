"""Hardware profiles: what a device can do and what it draws, for time and energy estimates.

`peak_flops` is the dense matmul peak per device in the training dtype; `utilization` the
fraction of it a training run is assumed to reach (model FLOPs utilisation); `watts` the draw
per device (chip plus its share of host and network); `pue` the datacentre's power usage
effectiveness. Figures are public spec-sheet and paper values; `cpu` is this project's 2-core
machine, its peak measured with a float32 matmul (STACK_NOTES.md) and its utilisation measured
on the CPU presets.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float
    utilization: float
    watts: float
    pue: float

    def seconds(self, train_flops: float, devices: int = 1) -> float:
        return train_flops / (self.peak_flops * self.utilization * devices)

    def energy_kwh(self, train_flops: float) -> float:
        """Energy at the wall for `train_flops`, whatever the number of devices."""
        device_hours = self.seconds(train_flops) / 3600
        return device_hours * self.watts * self.pue / 1000


PROFILES = {
    # Peaks are the vendors' dense bf16 figures; utilisation, watts (chip, host and network
    # share) and PUE are assumptions, not measurements: edit them for your fleet.
    "tpu_v4": Hardware("tpu_v4", 275e12, 0.40, 300.0, 1.10),
    "a100": Hardware("a100", 312e12, 0.40, 400.0, 1.10),
    "h100": Hardware("h100", 989e12, 0.40, 700.0, 1.10),
    "h200": Hardware("h200", 989e12, 0.40, 700.0, 1.10),
    "cpu": Hardware("cpu", 150e9, 0.35, 65.0, 1.0),
}


def profile(name: str) -> Hardware:
    if name not in PROFILES:
        raise KeyError(f"unknown hardware profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
