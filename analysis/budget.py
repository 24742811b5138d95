"""What to train next for a training budget, from a finished ladder (`glam-plan --budget`).

A ladder is a study whose runs vary the activated size N and the training tokens D (and, for
MoE, the expert count E), each run with its own schedule length. `fit_ladder` fits
L(N, D, E) (`analysis.loss_law`, Chinchilla's approach 3 with the routed extension when the
ladder has several expert counts) to the runs' final validation losses; `propose` takes the
compute-optimal N and D of each expert count for the budget and sizes a model of the base
config's shape family (the ladder's largest rung unless `model=` says otherwise) to that N. `write_study` writes the proposals as model presets and a
study that trains each at exactly the budget (`train.flops_budget`), so the next study is one
command:

    glam-plan --budget 3e14 --ladder docs/results/study_ladder/runs.csv +study=study_ladder
    glam-train -m --config-dir outputs/plan/budget_3e14 +study=budget_3e14
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.loss_law import Allocation, LossLaw, compute_optimal, fit_loss_law
from glam import accounting
from glam.config import ModelConfig
from glam.placement import dense_counterpart

COLUMNS = ("activated_params", "train_tokens", "val_loss", "n_experts")


def ladder_points(table: pd.DataFrame) -> pd.DataFrame:
    """The ladder's runs as fitting points: n (activated parameters), d (training tokens), loss
    (final validation loss, nats/token) and experts (1 for dense). Unfinished runs and runs
    without a validation loss are left out.

    Raises:
      ValueError: a column of `COLUMNS` is missing (the table is not a glam run table).
    """
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise ValueError(f"the ladder table lacks {missing}: give a glam run table "
                         "(glam-analyze's runs.csv, or an MLflow experiment of glam runs)")
    if "status" in table:
        table = table[table["status"] == "FINISHED"]
    table = table[np.isfinite(table["val_loss"].astype(float))]
    return pd.DataFrame({"n": table["activated_params"].astype(float),
                         "d": table["train_tokens"].astype(float),
                         "loss": table["val_loss"].astype(float),
                         "experts": table["n_experts"].astype(float).clip(lower=1)})


def fit_ladder(table: pd.DataFrame, n_boot: int = 100) -> LossLaw:
    """L(N, D[, E]) fitted to a ladder's run table (`ladder_points`); routed when it holds more
    than one expert count. Raises ValueError when the runs cannot determine the law."""
    points = ladder_points(table)
    routed = points["experts"].nunique() > 1
    return fit_loss_law(points["n"], points["d"], points["loss"],
                        points["experts"] if routed else None, n_boot=n_boot)


def size_model(base: ModelConfig, params: float, experts: int) -> ModelConfig:
    """A model of `base`'s family (head width, FFN ratio, MoE placement and routing) with about
    `params` activated parameters and `experts` experts (0: dense).

    Depth L = 1..96 (multiples of `moe_every` for MoE) and width M (a multiple of the head
    width, within 4x of the base's width per layer times L) are searched; the candidate closest
    in log(activated parameters) wins, ties broken towards the base's width per layer
    (score |log(P / params)| + 0.05 |log((M / L) / (M0 / L0))|). MoE expert widths are left to
    `plan.placement` (matched: the dense FLOPs).
    """
    head = base.d_model // base.n_heads if base.d_head is None else base.d_head
    ratio, ffn = base.d_model / base.n_layers, base.d_ff / base.d_model
    step = base.moe_every if experts else 1
    best, best_score = None, math.inf
    for layers in range(step, 97, step):
        low, high = max(1, round(ratio * layers / 4 / head)), round(4 * ratio * layers / head)
        for heads in range(low, max(low, high) + 1):
            width = head * heads
            shape = dataclasses.replace(
                dense_counterpart(base), d_model=width, n_layers=layers, n_heads=heads,
                d_head=None if base.d_head is None else head, attn_width=None,
                d_ff=max(1, round(ffn * width)))
            size = accounting.count(shape).activated_params
            score = abs(math.log(size / params)) + 0.05 * abs(math.log(width / layers / ratio))
            if score < best_score:
                best, best_score = shape, score
            if size > 2 * params:  # wider only grows: nothing closer at this depth
                break
        if heads == low and size > 2 * params:  # deeper only grows too
            break
    return dataclasses.replace(best, n_experts=experts, expert_d_ff=None)


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

    def row(self) -> dict:
        a = self.allocation
        return {"preset": self.name, "experts": self.experts, "optimal_params": a.params,
                "optimal_tokens": a.tokens, "d_model": self.model.d_model,
                "n_layers": self.model.n_layers, "d_ff": self.model.d_ff,
                "params": self.params, "tokens": self.tokens, "expected_val_loss": self.loss,
                "loss_low": self.loss_band[0], "loss_high": self.loss_band[1]}


def flops_per_param_token(base: ModelConfig) -> float:
    """Training FLOPs per activated parameter and token of `base` at glam's own count (3 x
    forward, attention and router included): what the budget is spent at, where Chinchilla's
    C = 6 N D would assume 6."""
    c = accounting.count(dense_counterpart(base))
    return c.train_flops_per_token / c.activated_params


def propose(law: LossLaw, flops: float, base: ModelConfig, experts: list[int],
            tag: str) -> list[Proposal]:
    """The compute-optimal configuration for `flops` training FLOPs at each expert count in
    `experts` (0: dense), sized from `base` (a resolved model config); the optimum is solved at
    `base`'s FLOPs per parameter and token."""
    out = []
    k = flops_per_param_token(base)
    for e in sorted(set(experts)):
        allocation = compute_optimal(law, flops, experts=max(e, 1), flops_per_param_token=k)
        model = size_model(base, allocation.params, e)
        counts = accounting.count(dense_counterpart(model))
        params, tokens = counts.activated_params, flops / counts.train_flops_per_token
        at = [r(params, tokens, max(e, 1)) for r in law.replicates()]
        loss = float(law(params, tokens, max(e, 1)))
        band = tuple(map(float, np.quantile(at, [0.025, 0.975]))) if at else (loss, loss)
        name = f"{tag}_{'dense' if e == 0 else f'e{e}'}"
        out.append(Proposal(name, e, allocation, dataclasses.replace(model, name=name),
                            float(params), float(tokens), loss, band))
    return out


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
            f"{max(p.experts, 1)}; this shape has {p.params:.4g} and the budget buys it "
            f"{p.tokens:.4g} tokens\n# (expected val loss {p.loss:.4f}, 95% band "
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

