"""Placing an MoE model against its dense counterpart at fixed activated FLOPs.

Two placements (`plan.placement`):
- `glam`, the paper's (GLaM, Du et al. 2021, section 2): the dense shape with every other FFN replaced
  by E experts of the dense FFN's width. Activated FLOPs rise a little (two two-matrix experts
  > one GeGLU); each model is plotted at its true FLOPs.
- `matched`: the expert width is solved so that the MoE model's activated forward FLOPs per token
  equal those of its dense counterpart (the same config with n_experts = 0), so the only change
  along an expert-count series is E.

Granularity G (Krajewski et al. 2024) splits each expert into G experts G times narrower and
routes each token to G times more of them. `model.expert_d_ff` is always the width at G = 1
(`glam`: the preset's or d_ff, which G must divide; `matched`: solved at G = 1), and each of
the E x G experts is expert_d_ff / G wide (`ModelConfig.expert_hidden`). Expert parameters and
expert FLOPs stay those of G = 1; the router's FLOPs (M x E x G per token and MoE layer) grow
with G and are counted in the activated FLOPs, and `glam.study.plan` refuses a point whose
FLOPs or expert parameters move more than `plan.tolerance` from its G = 1 counterpart
(`coarse_counterpart`). Shared experts (DeepSeekMoE) are as wide as a G = 1 expert, so
granularity leaves them unchanged too.
"""

from __future__ import annotations

import dataclasses

from glam import accounting
from glam.config import ConfigError, ModelConfig, Placement


def dense_counterpart(m: ModelConfig) -> ModelConfig:
    """`m` with no experts (no expert width, granularity or shared experts): the dense model of
    the same shape."""
    return dataclasses.replace(m, n_experts=0, expert_d_ff=None, granularity=1, shared_experts=0)


def flops(m: ModelConfig) -> int:
    """Activated forward FLOPs per token of `m` (`glam.accounting`)."""
    return accounting.count(m).forward_flops_per_token


def matched_expert_width(m: ModelConfig) -> int:
    """Expert hidden width at granularity 1 whose MoE model has the dense counterpart's forward
    FLOPs/token (the K routed and the shared experts plus the router cost what the dense FFN
    costs). FLOPs are affine in the width, so two evaluations give the exact solution before
    rounding.

    Raises:
      ConfigError (`plan.placement`): no positive width matches (the router alone costs more).
    """
    target = flops(dense_counterpart(m))
    coarse = dataclasses.replace(m, granularity=1)
    f1 = flops(dataclasses.replace(coarse, expert_d_ff=1))
    f2 = flops(dataclasses.replace(coarse, expert_d_ff=2))
    width = round(1 + (target - f1) / (f2 - f1))
    if width < 1:
        raise ConfigError(f"plan.placement: no expert width matches the dense FLOPs with "
                          f"n_experts={m.n_experts} (the router alone costs more); use fewer "
                          "experts or plan.placement=glam.")
    return width


def expert_width(m: ModelConfig, placement: Placement) -> int | None:
    """`model.expert_d_ff` of `m` under `placement`, the expert width at granularity 1: None for
    a dense model; the preset's `expert_d_ff`, else the dense FFN width, under `glam`; the
    FLOP-matching width under `matched`.

    Raises:
      ConfigError: `model.granularity` does not divide the `glam` width (the experts would not
        be exactly G times narrower); no width matches under `matched` (`plan.placement`).
    """
    if m.family != "moe":
        return None
    if placement == Placement.matched:
        width = matched_expert_width(m)
        if width < m.granularity:
            raise ConfigError(f"model.granularity: {m.granularity} experts per expert of the "
                              f"matched width {width} would be under one unit wide; use at "
                              f"most {width}.")
        return width
    width = m.expert_d_ff if m.expert_d_ff is not None else m.d_ff
    if width % m.granularity:
        raise ConfigError(f"model.granularity: {m.granularity} does not divide the expert width "
                          f"{width}, so the experts cannot be exactly G times narrower; use a "
                          "divisor of it (or plan.placement=matched).")
    return width


def coarse_counterpart(m: ModelConfig) -> ModelConfig:
    """`m` (resolved) at granularity 1, its experts G times wider: the model whose activated
    FLOPs and expert parameters a granularity series holds (`glam.study.plan`)."""
    return dataclasses.replace(m, granularity=1)
