"""Placing an MoE model against its dense counterpart at fixed activated FLOPs.

Two placements (`plan.placement`):
- `glam`, the paper's (GLaM, Du et al. 2021, section 2): the dense shape with every other FFN replaced
  by E experts of the dense FFN's width. Activated FLOPs rise a little (two two-matrix experts
  > one GeGLU); each model is plotted at its true FLOPs.
- `matched`: the expert width is solved so that the MoE model's activated forward FLOPs per token
  equal those of its dense counterpart (the same config with n_experts = 0), so the only change
  along an expert-count series is E.
"""

from __future__ import annotations

import dataclasses

from glam import accounting
from glam.config import ConfigError, ModelConfig, Placement


def dense_counterpart(m: ModelConfig) -> ModelConfig:
    """`m` with no experts (and no expert width): the dense model of the same shape."""
    return dataclasses.replace(m, n_experts=0, expert_d_ff=None)


def flops(m: ModelConfig) -> int:
    """Activated forward FLOPs per token of `m` (`glam.accounting`)."""
    return accounting.count(m).forward_flops_per_token


def matched_expert_width(m: ModelConfig) -> int:
    """Expert hidden width H whose MoE model has the dense counterpart's forward FLOPs/token.
    FLOPs are affine in H, so two evaluations give the exact solution before rounding.

    Raises:
      ConfigError (`plan.placement`): no positive width matches (the router alone costs more).
    """
    target = flops(dense_counterpart(m))
    f1 = flops(dataclasses.replace(m, expert_d_ff=1))
    f2 = flops(dataclasses.replace(m, expert_d_ff=2))
    width = round(1 + (target - f1) / (f2 - f1))
    if width < 1:
        raise ConfigError(f"plan.placement: no expert width matches the dense FLOPs with "
                          f"n_experts={m.n_experts} (the router alone costs more); use fewer "
                          "experts or plan.placement=glam.")
    return width


def expert_width(m: ModelConfig, placement: Placement) -> int | None:
    """The expert hidden width H of `m` under `placement`: None for a dense model; the preset's
    `expert_d_ff` or the dense FFN width under `glam`; the FLOP-matching width under `matched`."""
    if m.family != "moe":
        return None
    if placement == Placement.matched:
        return matched_expert_width(m)
    return m.expert_d_ff if m.expert_d_ff is not None else m.d_ff
