"""`glam-plan`: the points of a study with sizes, FLOPs and run-time estimates, FLOP-checked
(`glam.study.plan`); with `--budget`, the compute-optimal dense and MoE proposals from a
finished ladder's loss law, and over a ladder that varies the expert count or granularity the
E or G of lowest expected loss under the law form that fits better held out (`analysis.budget`,
docs/laws.md), written as a study.

    glam-plan +study=expert_count 'train.seed=range(3)'
    glam-plan --budget 3e12 --ladder docs/results/study_ladder/runs.csv +study=study_ladder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from glam.config import ConfigError
from glam.resolve import load, load_raw
from glam.study.plan import plan


def budget(flops: float, ladder: str, overrides: list[str], out: str | None) -> Path:
    """`glam-plan --budget`: fit the ladder, propose, write the study (`analysis.budget`), print
    the law with its intervals, what it leaves undetermined, per axis of E or G the ladder
    varies the law forms' held-out errors, the form used and the value of lowest expected loss
    (`choose`, a warning where it is not sized), the proposals, how far they lie outside the
    ladder (a warning beyond `EXTRAPOLATION_WARN`) and the command; returns the study file.

    Raises:
      ConfigError: `--out` cannot be written (checked before fitting); the ladder leaves an
        exponent undetermined (`--ladder`); the optimum is beyond the family's sizes
        (`--budget`).
      ValueError: the ladder cannot determine the loss law (named), or is not a run table.
      FileNotFoundError / ValueError: no such table or MLflow experiment.
    """
    import pandas as pd

    from analysis import budget as proposals
    from analysis.runs import load_runs, read_table
    from glam.resolve import to_container

    tag = proposals.budget_tag(flops)
    folder = Path(out or f"outputs/plan/{tag}")
    proposals.check_out(folder)
    path = Path(ladder)
    runs = (read_table(path) if path.suffix in (".csv", ".parquet") or path.exists()
            else load_runs(load_raw(overrides).logger.tracking_uri, ladder))
    rung = proposals.largest_rung(runs)
    if rung and not any(o.startswith(("model=", "+model=")) for o in overrides):
        overrides = [f"model={rung}", *overrides]  # size from the ladder's own family
    cfg, raw = load(overrides, "cpu"), load_raw(overrides).model
    law = proposals.fit_ladder(runs)
    print(f"fitted on {law.n_points} runs of {ladder}: {_law_text(law)}")
    for name, reason in law.undetermined().items():
        if name not in ("alpha", "beta"):  # those `propose` refuses
            print(f"glam-plan: warning: {name}: {reason}", file=sys.stderr)
    experts = sorted({int(e) for e in proposals.ladder_points(runs)["experts"]} | {1})
    chosen = proposals.propose(law, flops, cfg.model, [0 if e == 1 else e for e in experts], tag)
    for choice in proposals.choose(runs, flops, cfg.model, tag):
        print(_choice_text(choice, flops, chosen))
        if choice.refused:
            print(f"glam-plan: warning: {choice.comparison.axis}: the value of lowest "
                  f"expected loss was not sized: {choice.refused}", file=sys.stderr)
        if choice.proposal is not None:
            chosen.append(choice.proposal)
    for p in chosen:
        far = {k: v for k, v in p.beyond.items() if v > 1}
        if max(p.beyond.values()) > proposals.EXTRAPOLATION_WARN:
            print(f"glam-plan: warning: {p.name} extrapolates the law beyond the ladder's runs ("
                  + ", ".join(f"{k} {v:.3g}x" for k, v in far.items()) + "); the further, the "
                  "less its band can be trusted", file=sys.stderr)
    plain = to_container(cfg)
    study = proposals.write_study(
        chosen, flops, {"data": plain["data"], "eval": plain["eval"],
                        "train": {"batch_size": cfg.train.batch_size}}, folder, tag, raw)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(proposals.table(chosen).to_string(index=False, float_format="{:.4g}".format))
    print(f"beyond_ladder: how far outside the ladder's runs (budget, parameters or tokens) each "
          f"proposal lies (1: within; warned beyond {proposals.EXTRAPOLATION_WARN:g}x); loss_low"
          f"-loss_high: the 95% band of {len(law.boot)} bootstrap refits")
    print(f"wrote {len(chosen)} presets and the study {study}; train them with:\n"
          f"  glam-train -m --config-dir {folder} +study={tag}")
    return study


def _choice_text(choice, flops: float, existing: list) -> str:
    """The law forms compared along one axis, each with its held-out error (or why it was
    skipped), the form used, the expected loss of each candidate at the budget and the
    proposal of lowest expected loss."""
    c = choice.comparison
    where = f" at E = {c.experts:g}" if c.axis == "granularity" else ""
    lines = [f"law forms over {c.axis}{where} ({len(c.runs)} runs; held-out RMSE of log loss, "
             "folds over configurations):"]
    lines += [f"  {form}: {c.held_out[form]:.4g}" for form in c.held_out]
    lines += [f"  {form}: skipped: {why}" for form, why in c.skipped.items()]
    lines.append(f"  fits better: {c.chosen} ({c.reason})")
    name = "E" if c.axis == "experts" else "G"
    label = {x: "dense" if c.axis == "experts" and x == 1 else str(x) for x in choice.losses}
    lines.append(f"  expected loss at the optimum for {flops:.3g} FLOPs under {c.chosen}: "
                 + ", ".join(f"{name} = {label[x]}: {v:.4f}" for x, v in choice.losses.items())
                 + "".join(f"; {name} = {x}: {why}" for x, why in choice.skipped.items()))
    if choice.best is not None:
        # Chinchilla's form: the best is one of `propose`'s (an end of E's range; G = 1)
        experts = ((0 if choice.best == 1 else choice.best) if c.axis == "experts"
                   else int(c.experts))
        preset = (choice.proposal.name if choice.proposal is not None else
                  "not sized" if choice.refused else
                  next((p.name for p in existing if p.experts == experts), "not proposed"))
        lines.append(f"  lowest: {name} = {label[choice.best]} ({preset})")
    return "\n".join(lines)


def _law_text(law) -> str:
    """The fitted law, each exponent with its 95% bootstrap interval."""
    iv = law.intervals()

    def exponent(name: str) -> str:
        value = getattr(law, name)
        return f"{value:.3f}" + (f" [{iv[name][0]:.3g}, {iv[name][1]:.3g}]" if iv else "")

    experts = f" Ê^{exponent('gamma')}" if law.gamma else ""
    return (f"L(N, D{', E' if law.gamma else ''}) = {law.E:.3f} + {law.A:.4g} / (N^"
            f"{exponent('alpha')}{experts}) + {law.B:.4g} / D^{exponent('beta')} "
            "(95% intervals in brackets)")


def main(argv: list[str] | None = None) -> None:
    """`glam-plan [--json] [--hardware NAME] OVERRIDES...`, e.g. `glam-plan +study=expert_count`."""
    parser = argparse.ArgumentParser(prog="glam-plan", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--hardware", default="cpu", help="profile for the FLOPs-only estimate")
    parser.add_argument("--probe", action="store_true",
                        help="measure each distinct shape on this machine (a few seconds each, "
                             "cached in outputs/plan/calibration.json) and estimate wall times")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs the launcher runs at once (hydra.launcher.n_jobs); the probes "
                             "share the machine the same way")
    parser.add_argument("--budget", type=float, metavar="FLOPS",
                        help="propose the dense and MoE configurations of lowest expected "
                             "validation loss for this many training FLOPs, from the loss law "
                             "fitted to --ladder (and the expert count or granularity of "
                             "lowest loss when the ladder varies them), and write them as a "
                             "study")
    parser.add_argument("--ladder", metavar="RUNS",
                        help="with --budget: a finished ladder, as a run table (runs.csv or "
                             ".parquet from glam-analyze) or an MLflow experiment name")
    parser.add_argument("--out", metavar="DIR",
                        help="with --budget: where the presets and the study go "
                             "(default outputs/plan/budget_<FLOPS>)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.budget is not None:
        if not args.ladder:
            parser.error("--budget needs --ladder (the finished ladder's runs)")
        if not (args.budget > 0 and args.budget < float("inf")):
            parser.error(f"--budget must be a positive number of FLOPs, got {args.budget}")
        try:
            budget(args.budget, args.ladder, overrides, args.out)
        except (ConfigError, ValueError, FileNotFoundError, HydraException,
                OmegaConfBaseException) as err:
            print(f"glam-plan: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    try:
        rows = plan(overrides, args.hardware, probe=args.probe, jobs=args.jobs)
    except (ConfigError, KeyError, HydraException, OmegaConfBaseException) as err:
        print(f"glam-plan: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return
    import pandas as pd  # only for the table

    table = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    table["est_minutes"] = (table.pop("est_seconds") / 60).round(1)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False))
    total = table["est_minutes"].sum()
    if (table["estimate"] == "probe").all():
        from glam.study.probe import schedule

        basis = "wall time probed on this machine"
        wall = schedule(list(table["est_minutes"] * 60), args.jobs, 1.0)[1] / 60
    else:
        basis = (f"training FLOPs only, {args.hardware} profile; --probe adds set-up, compilation "
                 "and evaluation")
        wall = total / args.jobs
    print(f"total estimated time: {total:.1f} min of runs, {wall:.1f} min with {args.jobs} at a "
          f"time ({basis})")



if __name__ == "__main__":
    main()
