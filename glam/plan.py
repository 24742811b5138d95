"""Placing MoE variants against dense ones at fixed activated FLOPs.

Two placements (`plan.placement`):
- `glam`, the paper's: the dense shape with every other FFN replaced by E experts of the dense
  FFN's width. Activated FLOPs rise a little (two two-matrix experts > one GeGLU); each model is
  plotted at its true FLOPs.
- `matched`: the expert width is solved so that the MoE model's activated forward FLOPs per token
  equal those of its dense counterpart (the same config with n_experts = 0) within
  `plan.tolerance`, so the only change along an expert-count series is E.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from glam import accounting
from glam.config import Config, ConfigError, ModelConfig


def dense_counterpart(m: ModelConfig) -> ModelConfig:
    return dataclasses.replace(m, n_experts=0, expert_d_ff=None)


def flops(m: ModelConfig) -> int:
    return accounting.count(m).forward_flops_per_token


def matched_expert_width(m: ModelConfig) -> int:
    """Expert hidden width H whose MoE model has the dense counterpart's forward FLOPs/token.
    FLOPs are affine in H, so two evaluations give the exact solution before rounding."""
    target = flops(dense_counterpart(m))
    f1 = flops(dataclasses.replace(m, expert_d_ff=1))
    f2 = flops(dataclasses.replace(m, expert_d_ff=2))
    width = round(1 + (target - f1) / (f2 - f1))
    if width < 1:
        raise ConfigError(f"plan.placement: no expert width matches the dense FLOPs with "
                          f"n_experts={m.n_experts} (the router alone costs more); use fewer "
                          "experts or plan.placement=glam.")
    return width


def apply_placement(cfg: Config) -> None:
    """Fill in the derived expert width of a `matched` MoE config (in place)."""
    m = cfg.model
    if cfg.plan.placement == "matched" and m.family == "moe":
        m.expert_d_ff = matched_expert_width(m)


@dataclass(frozen=True)
class PlanRow:
    name: str
    family: str
    n_experts: int
    d_model: int
    n_layers: int
    d_ff: int
    expert_d_ff: int | None
    total_params: int
    activated_params: int
    forward_flops_per_token: int
    dense_flops_per_token: int  # of the same config with n_experts = 0
    train_tokens: int
    train_flops: float
    est_seconds: float
    overrides: str

    @classmethod
    def of(cls, cfg: Config, overrides: str, seconds_per_flop: float) -> "PlanRow":
        m, c = cfg.model, accounting.count(cfg.model)
        tokens = cfg.train.steps * cfg.train.batch_size * m.seq_len
        train_flops = float(tokens * c.train_flops_per_token)
        return cls(m.name, m.family, m.n_experts, m.d_model, m.n_layers, m.d_ff,
                   m.expert_hidden if m.family == "moe" else None, c.total_params,
                   c.activated_params, c.forward_flops_per_token, flops(dense_counterpart(m)),
                   tokens, train_flops, train_flops * seconds_per_flop, overrides)


def expand(params: dict[str, str]) -> list[list[str]]:
    """Hydra basic-sweeper params ({"model.n_experts": "0,4,8", ...}) -> override lists."""
    axes = [[f"{key}={v.strip()}" for v in str(values).split(",")] for key, values in params.items()]
    return [list(point) for point in itertools.product(*axes)]


def check_matched(rows: list[PlanRow], tolerance: float) -> None:
    """Refuse a series whose points' activated FLOPs are not all within `tolerance` of their
    dense counterparts' (the same config with n_experts = 0)."""
    bad = []
    for r in rows:
        gap = abs(r.forward_flops_per_token / r.dense_flops_per_token - 1)
        if gap > tolerance:
            bad.append(f"{r.overrides}: {r.forward_flops_per_token:,} FLOPs/token, "
                       f"{gap:.1%} from the dense {r.dense_flops_per_token:,}")
    if bad:
        raise ConfigError(f"plan.tolerance: {len(bad)} sweep point(s) break the {tolerance:.0%} "
                          "activated-FLOPs match:\n  " + "\n  ".join(bad))


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of the sweep that `overrides` select: the sweep config's hydra.sweeper.params
    and any comma-separated override (`train.seed=0,1`) expanded; or the single point itself."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from glam.config import CONF_DIR, register_configs

    fixed = [o for o in overrides if "," not in o.split("=", 1)[-1] or "[" in o]
    swept = dict(o.split("=", 1) for o in overrides if o not in fixed)
    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (the sweep callback)
        composed = compose("config", overrides=fixed, return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose("config", overrides=fixed, return_hydra_config=True)
    fixed_keys = {o.split("=", 1)[0].lstrip("+~") for o in fixed}
    params = {k: v for k, v in dict(composed.hydra.sweeper.params or {}).items()
              if k not in fixed_keys}
    params.update(swept)
    return [fixed + point for point in expand(params)] if params else [fixed]


def plan(overrides: list[str], hardware: str = "cpu") -> list[PlanRow]:
    """Plan rows of every sweep point; refuses a FLOP-matched study that breaks its tolerance."""
    from glam.count import load
    from glam.hardware import profile

    hw = profile(hardware)
    rows, cfg = [], None
    for point in sweep_points(overrides):
        cfg = load(point)
        rows.append(PlanRow.of(cfg, " ".join(o for o in point if o not in overrides),
                               hw.seconds(1.0)))
    if cfg is not None and cfg.study.match_flops:
        check_matched(rows, cfg.plan.tolerance)
    return rows


def main(argv: list[str] | None = None) -> None:
    """`glam-plan [--json] [--hardware NAME] OVERRIDES...`, e.g. `glam-plan +sweep=expert_count`."""
    import argparse
    import json
    import sys

    import pandas as pd

    parser = argparse.ArgumentParser(prog="glam-plan", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--hardware", default="cpu", help="profile for the run-time estimate")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = plan(overrides, args.hardware)
    except (ConfigError, KeyError) as err:
        raise SystemExit(f"glam-plan: {err}")
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return
    table = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    table["est_minutes"] = (table.pop("est_seconds") / 60).round(1)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False))
    print(f"total estimated time on {args.hardware}: {table['est_minutes'].sum():.1f} min")
