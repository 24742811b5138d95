"""What to train next for a training budget, from a finished ladder (`glam-plan --budget`).

A ladder is a study whose runs vary the activated size N and the training tokens D (and, for
MoE, the expert count E or the granularity G), each run with its own schedule length.
`fit_ladder` fits L(N, D, E) (`analysis.loss_law`, Chinchilla's approach 3 with the routed
extension when the ladder has several expert counts) to the runs' final validation losses;
`propose` refuses a law whose exponents the runs do not determine, takes the compute-optimal N
and D of each expert count for the budget and sizes a model of the base config's shape family
(the ladder's largest rung unless `model=` says otherwise) to that N, refusing an optimum that
family cannot reach. When the ladder varies E or G, `choose` also compares the law forms over
them by held-out error (`analysis.law_choice.compare_forms`) and proposes the E (G) of lowest
expected loss at the budget under the chosen form. `write_study` writes the proposals as model
presets and a study that trains each at exactly the budget (`train.flops_budget`), so the next
study is one command:

    glam-plan --budget 3e14 --ladder docs/results/study_ladder/runs.csv +study=study_ladder
    glam-train -m --config-dir outputs/plan/budget_3e14 +study=budget_3e14
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis import law_choice
from analysis.loss_law import Allocation, LossLaw, compute_optimal, fit_loss_law
from glam import accounting
from glam.config import ConfigError, ModelConfig
from glam.placement import dense_counterpart

COLUMNS = ("activated_params", "train_tokens", "val_loss", "n_experts")
MAX_LAYERS = 96  # the deepest shape `size_model` tries
SIZING_SLACK = 2.0  # an optimum this far outside the sizes a family reaches is refused
EXTRAPOLATION_WARN = 10.0  # a budget, N or D this far outside the ladder's runs is warned about
MOE_BOOT = 100  # bootstrap refits of the law form `choose` sizes a proposal under


def ladder_points(table: pd.DataFrame) -> pd.DataFrame:
    """The ladder's runs as fitting points (`analysis.law_choice.points`): n (activated
    parameters), d (training tokens), loss (final validation loss, nats/token), experts (1 for
    dense) and granularity (1 without the column). Unfinished runs and runs without a validation
    loss are left out.

    Raises:
      ValueError: a column of `COLUMNS` is missing (the table is not a glam run table).
    """
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise ValueError(f"the ladder table lacks {missing}: give a glam run table "
                         "(glam-analyze's runs.csv, or an MLflow experiment of glam runs)")
    return law_choice.points(table)


def fit_ladder(table: pd.DataFrame, n_boot: int = 100) -> LossLaw:
    """L(N, D[, E]) fitted to a ladder's run table (`ladder_points`); routed when it holds more
    than one expert count. Raises ValueError when the runs cannot determine the law."""
    points = ladder_points(table)
    routed = points["experts"].nunique() > 1
    return fit_loss_law(points["n"], points["d"], points["loss"],
                        points["experts"] if routed else None, n_boot=n_boot)


def _shape(base: ModelConfig, layers: int, heads: int) -> ModelConfig:
    """`base`'s dense shape at `layers` x `heads` heads of its head width (FFN ratio kept)."""
    head = base.d_model // base.n_heads if base.d_head is None else base.d_head
    return dataclasses.replace(
        dense_counterpart(base), d_model=head * heads, n_layers=layers, n_heads=heads,
        d_head=None if base.d_head is None else head, attn_width=None,
        d_ff=max(1, round(base.d_ff / base.d_model * head * heads)))


def _heads(base: ModelConfig, layers: int) -> tuple[int, int]:
    """The fewest and most heads `size_model` tries at `layers` layers."""
    head = base.d_model // base.n_heads if base.d_head is None else base.d_head
    ratio = base.d_model / base.n_layers
    low = max(1, round(ratio * layers / 4 / head))
    return low, max(low, round(4 * ratio * layers / head))


def size_model(base: ModelConfig, params: float, experts: int,
               granularity: int = 1) -> ModelConfig:
    """A model of `base`'s family (head width, FFN ratio, MoE placement and routing) with about
    `params` activated parameters, `experts` experts (0: dense) and `granularity` G.

    Depth L = 1..MAX_LAYERS (multiples of `moe_every` for MoE) and width M (a multiple of the
    head width, within 4x of the base's width per layer times L) are searched; the candidate
    closest in log(activated parameters) wins, ties broken towards the base's width per layer
    (score |log(P / params)| + 0.05 |log((M / L) / (M0 / L0))|). MoE expert widths are left to
    `plan.placement` (matched: the dense FLOPs). `size_range` gives the sizes it can reach.
    """
    ratio = base.d_model / base.n_layers
    step = base.moe_every if experts else 1
    best, best_score = None, math.inf
    for layers in range(step, MAX_LAYERS + 1, step):
        low, high = _heads(base, layers)
        for heads in range(low, high + 1):
            shape = _shape(base, layers, heads)
            size = accounting.count(shape).activated_params
            score = (abs(math.log(size / params))
                     + 0.05 * abs(math.log(shape.d_model / layers / ratio)))
            if score < best_score:
                best, best_score = shape, score
            if size > 2 * params:  # wider only grows: nothing closer at this depth
                break
        if heads == low and size > 2 * params:  # deeper only grows too
            break
    return dataclasses.replace(best, n_experts=experts, expert_d_ff=None,
                               granularity=granularity if experts else 1)


def size_range(base: ModelConfig, experts: int) -> tuple[int, int]:
    """The fewest and most activated parameters `size_model` reaches in `base`'s family."""
    step = base.moe_every if experts else 1
    deepest = MAX_LAYERS // step * step
    return (accounting.count(_shape(base, step, _heads(base, step)[0])).activated_params,
            accounting.count(_shape(base, deepest, _heads(base, deepest)[1])).activated_params)


@dataclass(frozen=True)
class Proposal:
    """One configuration to train for the budget: the law's optimum, and the model sized to
    it with what the law expects of that model at the budget."""

    name: str  # the preset's name
    experts: int  # 0: dense
    allocation: Allocation  # the law's optimum (N_opt, D_opt, its loss and bands)
    model: ModelConfig  # sized to allocation.params (dense shape; MoE widths by placement)
    params: float  # the sized model's activated parameters (its dense shape's)
    tokens: float  # the tokens the budget buys it: C / (3 x forward FLOPs per token)
    loss: float  # the law's loss at (params, tokens)
    loss_band: tuple[float, float]  # 95% bootstrap band of that loss
    beyond: dict[str, float]  # `extrapolation` of the budget, params and tokens
    granularity: int = 1

    def row(self) -> dict:
        a = self.allocation
        return {"preset": self.name, "experts": self.experts, "granularity": self.granularity,
                "optimal_params": a.params, "optimal_tokens": a.tokens,
                "d_model": self.model.d_model,
                "n_layers": self.model.n_layers, "d_ff": self.model.d_ff,
                "params": self.params, "tokens": self.tokens, "expected_val_loss": self.loss,
                "loss_low": self.loss_band[0], "loss_high": self.loss_band[1],
                "beyond_ladder": max(self.beyond.values())}


def flops_per_param_token(base: ModelConfig) -> float:
    """Training FLOPs per activated parameter and token of `base` at glam's own count (3 x
    forward, attention and router included): what the budget is spent at, where Chinchilla's
    C = 6 N D would assume 6."""
    c = accounting.count(dense_counterpart(base))
    return c.train_flops_per_token / c.activated_params


def extrapolation(law: LossLaw, flops: float, k: float, params: float,
                  tokens: float) -> dict[str, float]:
    """How far outside the fitted runs a proposal lies: for the budget (against k N D of the
    runs' smallest and largest N and D), its parameters and its tokens, the factor beyond the
    runs' range (1: within it)."""
    (n0, n1), (d0, d1) = law.n_range, law.d_range

    def beyond(x, low, high):
        return float(max(x / high, low / x, 1.0))

    return {"budget": beyond(flops, k * n0 * d0, k * n1 * d1), "params": beyond(params, n0, n1),
            "tokens": beyond(tokens, d0, d1)}


def check_determined(law: LossLaw) -> None:
    """Refuse a law whose alpha or beta the runs do not determine (`LossLaw.undetermined`):
    its optimum would be a guess with a band that does not say so.

    Raises:
      ConfigError (`--ladder`): names each undetermined exponent, why, and the runs to add.
    """
    bad = {k: v for k, v in law.undetermined().items() if k in ("alpha", "beta")}
    if bad:
        raise ConfigError("--ladder: the runs do not determine the loss law, so no budget can "
                          "be planned from them:\n  " + "\n  ".join(
                              f"{k}: {v}" for k, v in bad.items()))


def _proposal(law: LossLaw, flops: float, base: ModelConfig, experts: int, name: str,
              at: float, granularity: int = 1) -> Proposal:
    """The compute-optimal configuration of `law` (evaluated at `at` experts) for `flops`,
    sized from `base` with `experts` (0: dense) and `granularity`. Raises ConfigError
    (`--budget`) for an optimum beyond the family's sizes, as `propose`."""
    k = flops_per_param_token(base)
    allocation = compute_optimal(law, flops, experts=at, flops_per_param_token=k)
    low, high = size_range(base, experts)
    if not low / SIZING_SLACK <= allocation.params <= high * SIZING_SLACK:
        # N_opt grows as C^(beta / (alpha + beta)): the budgets whose optimum it reaches
        reach = [flops * (n / allocation.params) ** ((law.alpha + law.beta) / law.beta)
                 for n in (low, high)]
        raise ConfigError(
            f"--budget {flops:.3g}: the law's optimum{f' at E = {experts}' if experts else ''} "
            f"is {allocation.params:.3g} activated parameters, outside the {low:.3g}-"
            f"{high:.3g} that the family of model={base.name} reaches (1-{MAX_LAYERS} "
            f"layers); give a budget of {reach[0]:.2g}-{reach[1]:.2g} FLOPs, or size from "
            "a model= of another family")
    model = size_model(base, allocation.params, experts, granularity)
    counts = accounting.count(dense_counterpart(model))
    params, tokens = counts.activated_params, flops / counts.train_flops_per_token
    at_runs = [r(params, tokens, at) for r in law.replicates()]
    loss = float(law(params, tokens, at))
    band = tuple(map(float, np.quantile(at_runs, [0.025, 0.975]))) if at_runs else (loss, loss)
    return Proposal(name, experts, allocation, dataclasses.replace(model, name=name),
                    float(params), float(tokens), loss, band,
                    extrapolation(law, flops, k, params, tokens), model.granularity)


def propose(law: LossLaw, flops: float, base: ModelConfig, experts: list[int],
            tag: str) -> list[Proposal]:
    """The compute-optimal configuration for `flops` training FLOPs at each expert count in
    `experts` (0: dense), sized from `base` (a resolved model config); the optimum is solved at
    `base`'s FLOPs per parameter and token.

    Raises:
      ConfigError: `--ladder` when `check_determined` refuses the law; `--budget` when an
        optimum lies more than SIZING_SLACK outside the sizes of `base`'s family
        (`size_range`), naming the budgets that family can serve.
    """
    check_determined(law)
    return [_proposal(law, flops, base, e, f"{tag}_{'dense' if e == 0 else f'e{e}'}", max(e, 1))
            for e in sorted(set(experts))]


def candidates(ladder: list[float]) -> list[int]:
    """The values `choose` weighs along an axis: powers of 2 from 1 to the ladder's largest
    value, and the ladder's own; none beyond, where the fit has no runs to check its trend."""
    top = max(ladder)
    return sorted({2**i for i in range(int(math.log2(top)) + 1)} | {int(v) for v in ladder})


@dataclass(frozen=True)
class Choice:
    """The E (or G) of lowest expected loss at the budget along one axis of the ladder."""

    comparison: law_choice.Comparison  # the forms compared; `comparison.chosen` is the one used
    losses: dict[int, float]  # candidate E (1: dense) or G -> loss at its compute optimum
    skipped: dict[int, str]  # candidate -> why the law gives no optimum there
    best: int | None
    proposal: Proposal | None  # the sized model; None for Chinchilla's form or when refused
    refused: str = ""  # why no model was sized at `best`


def _at(law, x: int, experts_axis: bool) -> tuple[LossLaw, float]:
    """`law` (of any form) at candidate `x` as a LossLaw in N and D, with the expert count to
    evaluate it at: loss_law's law is routed over E and flat in G."""
    if isinstance(law, LossLaw):
        return law, float(x) if experts_axis else 1.0
    return law.at(x), 1.0


def choose(table: pd.DataFrame, flops: float, base: ModelConfig, tag: str) -> list[Choice]:
    """Per axis the ladder varies (`law_choice.compare_forms`: E at granularity 1, G at one expert
    count), the candidate (`candidates`) of lowest loss at its compute optimum for `flops`
    (at `base`'s FLOPs per parameter and token) under the form of lower held-out error, sized
    as `<tag>_best_e<E>[_g<G>]` (`_best_dense`) unless that form is Chinchilla's: its best E is
    an end of the ladder's range, whose proposal `propose` makes, and its best G is 1.

    A best candidate whose law leaves alpha or beta undetermined, or whose optimum the family
    cannot reach, is `refused` with the reason; an axis no form could be fitted on is left out.
    """
    pts, k, out = ladder_points(table), flops_per_param_token(base), []
    for comparison in law_choice.compare_forms(pts, n_boot=0):  # bands: the chosen form's refit
        if comparison.chosen is None:
            continue
        law = comparison.laws[comparison.chosen]
        experts_axis = comparison.axis == "experts"
        axis = comparison.runs["experts" if experts_axis else "granularity"]
        losses, skipped = {}, {}
        for x in candidates(list(axis)):
            at, experts = _at(law, x, experts_axis)
            try:
                losses[x] = compute_optimal(at, flops, experts, flops_per_param_token=k).loss
            except ValueError as err:  # an exponent not positive at x: no optimum
                skipped[x] = str(err)
        if not losses:
            out.append(Choice(comparison, losses, skipped, None, None,
                              "no candidate has an optimum"))
            continue
        best = min(losses, key=losses.get)  # ties (a law flat in G): the smaller value
        e, g = (best, 1) if experts_axis else (int(comparison.experts), best)
        proposal, refused = None, ""
        if comparison.chosen != "chinchilla":
            law = law_choice.fit_form(comparison.chosen, comparison.runs, n_boot=MOE_BOOT)
            at, _ = _at(law, best, experts_axis)
            bad = {n: r for n, r in at.undetermined().items() if n in ("alpha", "beta")}
            name = f"{tag}_best_{'dense' if e == 1 else f'e{e}'}" + (f"_g{g}" if g > 1 else "")
            if bad:
                refused = "; ".join(f"{n}: {r}" for n, r in bad.items())
            else:
                try:
                    proposal = _proposal(at, flops, base, 0 if e == 1 else e, name, 1.0, g)
                except ConfigError as err:  # beyond the family's sizes
                    refused = str(err)
        out.append(Choice(comparison, losses, skipped, best, proposal, refused))
    return out


def check_out(out: Path) -> None:
    """Refuse a folder `write_study` could not write into, before any fitting: a file, a path
    through a file, or one under a folder this process may not write.

    Raises:
      ConfigError (`--out`): what is in the way, and the fix.
    """
    for path in (out, out / "model", out / "study"):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {out}: {path} is a file; give a folder (new or earlier "
                              "written by glam-plan --budget)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder; give a folder path")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write in {existing} ({err.strerror}); give a "
                          "folder this user may write") from None


def write_study(proposals: list[Proposal], flops: float, base_overrides: dict, out: Path,
                name: str, raw: ModelConfig) -> Path:
    """Write `<out>/model/<preset>.yaml` for each proposal and `<out>/study/<name>.yaml`, a
    study of the proposals at `flops` training FLOPs each; returns the study file.

    `base_overrides`: config sections (plain dicts) copied into the study, e.g. the ladder's
    `data` and `train.batch_size`, so the proposals train as the ladder did. `raw`: the base
    model before resolution, whose vocabulary and routing (dispatch `auto`, group size) the
    presets keep, so resolution fills them for the backend the study runs on.
    """
    from omegaconf import OmegaConf

    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "study").mkdir(parents=True, exist_ok=True)
    for p in proposals:
        unresolved = dataclasses.replace(p.model, vocab_size=raw.vocab_size, router=raw.router)
        fields = OmegaConf.to_container(OmegaConf.structured(unresolved), enum_to_str=True)
        (out / "model" / f"{p.name}.yaml").write_text(
            f"# glam-plan --budget {flops:.3g}: {p.allocation.params:.4g} activated parameters "
            f"and {p.allocation.tokens:.4g} tokens are compute-optimal\n# at E = "
            f"{max(p.experts, 1)}, G = {p.granularity}; this shape has {p.params:.4g} and the "
            f"budget buys it {p.tokens:.4g} tokens\n# (expected val loss {p.loss:.4f}, 95% band "
            f"{p.loss_band[0]:.4f}-{p.loss_band[1]:.4f})\n"
            + yaml.safe_dump(fields, sort_keys=False))
    base_overrides = dict(base_overrides)
    train = {**base_overrides.pop("train", {}), "flops_budget": float(flops)}
    study = {"defaults": ["base", {"override /model": proposals[0].name}, "_self_"],
             "study": {"name": name, "match_flops": False},
             "plan": {"placement": "matched"}, "train": train, **base_overrides,
             "hydra": {"sweeper": {"params": {"model": ",".join(p.name for p in proposals)}}}}
    path = out / "study" / f"{name}.yaml"
    path.write_text(f"# @package _global_\n# Written by glam-plan --budget {flops:.3g}: every "
                    "point trains for the budget (train.flops_budget sets its steps).\n"
                    + yaml.safe_dump(study, sort_keys=False))
    return path


def table(proposals: list[Proposal]) -> pd.DataFrame:
    return pd.DataFrame([p.row() for p in proposals])


def largest_rung(table: pd.DataFrame) -> str | None:
    """The model preset of the ladder's largest run (its `param.model.name`), if recorded."""
    if "param.model.name" not in table:
        return None
    rows = table[np.isfinite(table["activated_params"].astype(float))]
    return None if rows.empty else str(rows.loc[rows["activated_params"].idxmax(),
                                                "param.model.name"])


def budget_tag(flops: float) -> str:
    """A study name for a budget: 3e12 -> budget_3e12, 2.5e13 -> budget_2p5e13."""
    return "budget_" + f"{flops:.3g}".replace("+", "").replace(".", "p")

