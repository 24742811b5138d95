"""Device time and energy of runs and of the paper's presets, in the style of GLaM Table 1."""

from __future__ import annotations

import pandas as pd

from glam import accounting
from glam.hardware import profile

# (preset, training tokens) of GLaM Table 1's comparison.
PAPER_RUNS = (("paper/gpt3_175b", 300e9), ("paper/glam_64b_64e", 600e9))


def run_energy(table: pd.DataFrame, hardware: str) -> pd.DataFrame:
    """Estimated device-hours and energy of each run in `table` on `hardware`."""
    hw = profile(hardware)
    out = table[["run_name", "family", "n_experts", "activated_params",
                 "forward_flops_per_token", "train_flops_total"]].copy()
    out["device_hours"] = out["train_flops_total"].map(hw.seconds) / 3600
    out["energy_kwh"] = out["train_flops_total"].map(hw.energy_kwh)
    return out


def study_energy(table: pd.DataFrame, hardware: str) -> dict:
    per_run = run_energy(table, hardware)
    return {"hardware": hardware, "runs": len(per_run),
            "device_hours": float(per_run["device_hours"].sum()),
            "energy_kwh": float(per_run["energy_kwh"].sum())}


def paper_table(hardware: str) -> pd.DataFrame:
    """GLaM Table 1's columns for GPT-3 and GLaM 64B/64E, from this project's own accounting."""
    from glam.resolve import load

    hw = profile(hardware)
    rows = []
    for preset, tokens in PAPER_RUNS:
        m = load([f"model={preset}"], backend="cpu").model  # dispatch changes no count
        c = accounting.count(m)
        train_flops = tokens * c.train_flops_per_token
        rows.append({"model": m.name, "total_params_B": c.total_params / 1e9,
                     "activated_params_B": c.activated_params / 1e9,
                     "inference_GFLOPs_per_token": c.forward_flops_per_token / 1e9,
                     "train_tokens_B": tokens / 1e9, "train_flops": train_flops,
                     "device_hours": hw.seconds(train_flops) / 3600,
                     "energy_MWh": hw.energy_kwh(train_flops) / 1000})
    return pd.DataFrame(rows)
