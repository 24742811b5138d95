"""The points of a study with sizes, FLOPs and run-time estimates, FLOP-checked (`plan`), as
`glam-plan` (`glam.cli.plan`) prints them and a study's launch checks them."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from glam import accounting
from glam.config import ConfigError
from glam.hardware import profile
from glam.placement import coarse_counterpart, dense_counterpart, flops
from glam.resolve import ResolvedConfig, load
from glam.study.points import expand


@dataclass(frozen=True)
class PlanRow:
    """One point: its model, counts (`glam.accounting`) and training cost."""

    name: str
    family: str
    n_experts: int
    granularity: int
    shared_experts: int
    d_model: int
    n_layers: int
    d_ff: int
    expert_d_ff: int | None
    total_params: int
    activated_params: int
    forward_flops_per_token: int
    dense_flops_per_token: int  # of the same config with n_experts = 0
    expert_params: int  # routed and shared experts
    coarse_flops_per_token: int  # of the same config at granularity 1 (experts G x wider)
    coarse_expert_params: int
    train_tokens: int  # steps x batch x seq_len
    train_flops: float  # train_tokens x 3 x forward FLOPs/token
    est_seconds: float  # wall time: probed on this machine, or FLOPs at the profile's utilisation
    estimate: str  # "probe" (measured costs, glam.study.probe) or "flops" (training FLOPs only)
    overrides: str  # what distinguishes this point from the command line

    @classmethod
    def of(cls, cfg: ResolvedConfig, overrides: str, seconds_per_flop: float) -> "PlanRow":
        """The row of `cfg`; `seconds_per_flop` converts training FLOPs to the estimate."""
        m, c = cfg.model, accounting.count(cfg.model)
        coarse = accounting.count(coarse_counterpart(m))
        tokens = cfg.train.steps * cfg.train.batch_size * m.seq_len
        train_flops = float(tokens * c.train_flops_per_token)
        return cls(m.name, m.family, m.n_experts, m.granularity, m.shared_experts, m.d_model,
                   m.n_layers, m.d_ff, m.expert_hidden if m.family == "moe" else None,
                   c.total_params, c.activated_params, c.forward_flops_per_token,
                   flops(dense_counterpart(m)), c.expert_params, coarse.forward_flops_per_token,
                   coarse.expert_params, tokens, train_flops, train_flops * seconds_per_flop,
                   "flops", overrides)


def check_matched(rows: list[PlanRow], tolerance: float, match_flops: bool = True) -> None:
    """Refuse a series whose points' activated FLOPs are not all within `tolerance` of their
    dense counterparts' (the same config with n_experts = 0; with `match_flops`), or whose
    fine-grained points
    (granularity G > 1) move their activated FLOPs or expert parameters more than `tolerance`
    from their granularity-1 counterparts' (`glam.placement.coarse_counterpart`; the router's
    FLOPs, M x E x G, are counted).

    Raises:
      ConfigError (`plan.tolerance`): lists every point outside the tolerance.
    """
    bad = []
    for r in rows:
        checks = [("FLOPs/token", r.forward_flops_per_token, r.dense_flops_per_token, "dense")
                  ] if match_flops else []
        if r.granularity > 1:
            checks += [("FLOPs/token", r.forward_flops_per_token, r.coarse_flops_per_token,
                        "granularity-1"),
                       ("expert params", r.expert_params, r.coarse_expert_params,
                        "granularity-1")]
        for what, value, reference, of in checks:
            gap = abs(value / reference - 1)
            if gap > tolerance:
                bad.append(f"{r.overrides}: {value:,} {what}, {gap:.1%} from the {of} "
                           f"{reference:,}")
    if bad:
        raise ConfigError(f"plan.tolerance: {len(bad)} study point(s) break the {tolerance:.0%} "
                          "activated-FLOPs match:\n  " + "\n  ".join(bad))


def plan(overrides: list[str], hardware: str = "cpu", backend: str = "cpu", probe: bool = False,
         jobs: int = 1) -> list[PlanRow]:
    """Plan rows of every point `overrides` select (`glam.study.points.expand`); refuses a
    FLOP-matched study that breaks its tolerance. `backend` only fixes `dispatch=auto`, which
    changes no count. With `probe`, each distinct shape is measured on this machine
    (`glam.study.probe`, `jobs` at a time, as many as the launcher runs at once) and the
    estimates are wall times; a shape whose probe fails keeps its FLOPs-only estimate.

    Raises:
      ConfigError: no point, a point's config is invalid, or the FLOP match is broken.
    """
    seconds_per_flop = profile(hardware).seconds(1.0)
    rows, cfgs = [], []
    points = expand(overrides)
    if not points:
        raise ConfigError("the overrides select no point (an empty sweep such as range(0,0)); "
                          "give at least one value to every swept key.")
    for point in points:
        cfgs.append(load(point, backend))
        distinct = " ".join(o for o in point if o not in overrides)
        rows.append(PlanRow.of(cfgs[-1], distinct, seconds_per_flop))
    if cfgs:  # granularity is always checked against G = 1; the dense match when asked for
        check_matched(rows, cfgs[-1].plan.tolerance, cfgs[-1].study.match_flops)
    if probe:
        rows = probed(rows, cfgs, points, jobs)
    return rows


def probed(rows: list[PlanRow], cfgs: list[ResolvedConfig], points: list[list[str]],
           jobs: int) -> list[PlanRow]:
    """`rows` with wall-time estimates from probes of their shapes (`glam.study.probe`): a
    run's compilation is warm when an earlier point compiled the same programs into the
    compilation cache it shares; with `jobs` > 1 the runs are scheduled in order on that many
    workers, the last ones faster as fewer share the machine."""
    from glam.study.probe import alone_speedup, calibrate, program_key, schedule, shape_key

    keys = [shape_key(c, jobs) for c in cfgs]
    costs = calibrate(dict(zip(keys, points)), jobs)
    compiled, out = set(), []
    for row, cfg, key in zip(rows, cfgs, keys):
        c = costs[key]
        if isinstance(c, str):
            print(f"glam-plan: no probe for {row.overrides or row.name}: {c}", file=sys.stderr)
            out.append(row)
            continue
        program = program_key(cfg)  # e.g. two arms' corpora share their programs
        warm = program in compiled and bool(cfg.train.compilation_cache_dir)
        compiled.add(program)
        seconds = c.run_seconds(cfg.train.steps, cfg.eval.every, cfg.checkpoint.every, warm)
        out.append(dataclasses.replace(row, est_seconds=seconds, estimate="probe"))
    probes = [(p, costs[k]) for p, k in zip(points, keys) if not isinstance(costs[k], str)]
    if jobs > 1 and probes:  # the last runs of a study share the machine with fewer others
        walls, _ = schedule([r.est_seconds for r in out], jobs, alone_speedup(*probes[0], jobs))
        out = [dataclasses.replace(r, est_seconds=w) if r.estimate == "probe" else r
               for r, w in zip(out, walls)]
    return out
