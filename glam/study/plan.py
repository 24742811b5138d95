"""`glam-plan`: the points of a study with sizes, FLOPs and run-time estimates, FLOP-checked.

    glam-plan +study=expert_count 'train.seed=range(3)'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from glam import accounting
from glam.config import ConfigError
from glam.hardware import profile
from glam.placement import dense_counterpart, flops
from glam.resolve import ResolvedConfig, load
from glam.study.points import expand


@dataclass(frozen=True)
class PlanRow:
    """One point: its model, counts (`glam.accounting`) and training cost."""

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
    train_tokens: int  # steps x batch x seq_len
    train_flops: float  # train_tokens x 3 x forward FLOPs/token
    est_seconds: float  # train_flops at the hardware profile's assumed utilisation
    overrides: str  # what distinguishes this point from the command line

    @classmethod
    def of(cls, cfg: ResolvedConfig, overrides: str, seconds_per_flop: float) -> "PlanRow":
        """The row of `cfg`; `seconds_per_flop` converts training FLOPs to the estimate."""
        m, c = cfg.model, accounting.count(cfg.model)
        tokens = cfg.train.steps * cfg.train.batch_size * m.seq_len
        train_flops = float(tokens * c.train_flops_per_token)
        return cls(m.name, m.family, m.n_experts, m.d_model, m.n_layers, m.d_ff,
                   m.expert_hidden if m.family == "moe" else None, c.total_params,
                   c.activated_params, c.forward_flops_per_token, flops(dense_counterpart(m)),
                   tokens, train_flops, train_flops * seconds_per_flop, overrides)


def check_matched(rows: list[PlanRow], tolerance: float) -> None:
    """Refuse a series whose points' activated FLOPs are not all within `tolerance` of their
    dense counterparts' (the same config with n_experts = 0).

    Raises:
      ConfigError (`plan.tolerance`): lists every point outside the tolerance.
    """
    bad = []
    for r in rows:
        gap = abs(r.forward_flops_per_token / r.dense_flops_per_token - 1)
        if gap > tolerance:
            bad.append(f"{r.overrides}: {r.forward_flops_per_token:,} FLOPs/token, "
                       f"{gap:.1%} from the dense {r.dense_flops_per_token:,}")
    if bad:
        raise ConfigError(f"plan.tolerance: {len(bad)} study point(s) break the {tolerance:.0%} "
                          "activated-FLOPs match:\n  " + "\n  ".join(bad))


def plan(overrides: list[str], hardware: str = "cpu", backend: str = "cpu") -> list[PlanRow]:
    """Plan rows of every point `overrides` select (`glam.study.points.expand`); refuses a
    FLOP-matched study that breaks its tolerance. `backend` only fixes `dispatch=auto`, which
    changes no count.

    Raises:
      ConfigError: no point, a point's config is invalid, or the FLOP match is broken.
    """
    seconds_per_flop = profile(hardware).seconds(1.0)
    rows, cfg = [], None
    points = expand(overrides)
    if not points:
        raise ConfigError("the overrides select no point (an empty sweep such as range(0,0)); "
                          "give at least one value to every swept key.")
    for point in points:
        cfg = load(point, backend)
        distinct = " ".join(o for o in point if o not in overrides)
        rows.append(PlanRow.of(cfg, distinct, seconds_per_flop))
    if cfg is not None and cfg.study.match_flops:
        check_matched(rows, cfg.plan.tolerance)
    return rows


def main(argv: list[str] | None = None) -> None:
    """`glam-plan [--json] [--hardware NAME] OVERRIDES...`, e.g. `glam-plan +study=expert_count`."""
    import pandas as pd  # only for the table

    parser = argparse.ArgumentParser(prog="glam-plan", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--hardware", default="cpu", help="profile for the run-time estimate")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = plan(overrides, args.hardware)
    except (ConfigError, KeyError, HydraException, OmegaConfBaseException) as err:
        print(f"glam-plan: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return
    table = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    table["est_minutes"] = (table.pop("est_seconds") / 60).round(1)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False))
    print(f"total estimated time on {args.hardware}: {table['est_minutes'].sum():.1f} min")
