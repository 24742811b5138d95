"""Optimisers (AdamW; Adafactor as GLaM used it) and learning-rate schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from glam.config import OptimizerConfig, ScheduleConfig


def lr_schedule(cfg: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Learning rate of update number `count` + 1 (`count` updates already applied): warmup
    reaches the peak at update `warmup_steps`, and the last update uses the final rate; no update
    is spent at rate 0."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_fraction
    if cfg.name == "cosine":
        base = optax.warmup_cosine_decay_schedule(0.0, peak, warmup,
                                                  max(total_steps, warmup + 1), end)
    elif cfg.name == "wsd":
        decay = max(1, round(cfg.decay_fraction * total_steps))
        stable = max(0, total_steps - warmup - decay)
        base = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
             optax.linear_schedule(peak, end, decay)],
            boundaries=[warmup, warmup + stable])
    elif cfg.name == "glam":
        hold = max(cfg.constant_steps, 1)

        def base(update):
            update = jnp.asarray(update, jnp.float32)
            ramp = jnp.minimum(1.0, update / warmup) if warmup else 1.0
            return peak * ramp * jnp.sqrt(hold / jnp.maximum(update, hold))
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return lambda count: base(count + 1)


def capped_decay(decay_rate: float, cap: float):
    """Adafactor's second-moment decay 1 - (t+1)^-decay_rate, capped at `cap` (GLaM: 0.99)."""

    def beta2(step, exponent=decay_rate):
        t = jnp.asarray(step + 1, jnp.float32)
        return jnp.minimum(1.0 - t ** (-exponent), cap)

    return beta2


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimiser of `cfg`, with optional global-norm gradient clipping in front."""
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=_matrices)
    elif cfg.name == "adafactor":
        parts = [optax.scale_by_factored_rms(
            factored=cfg.factored, decay_rate=cfg.decay_rate,
            min_dim_size_to_factor=cfg.min_dim_size_to_factor,
            decay_rate_fn=capped_decay(cfg.decay_rate, cfg.beta2_cap))]
        if cfg.update_clipping is not None:
            parts.append(optax.clip_by_block_rms(cfg.update_clipping))
        parts.append(optax.scale_by_learning_rate(schedule, flip_sign=False))
        if cfg.multiply_by_parameter_scale:
            parts.append(optax.scale_by_param_block_rms())
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_matrices))
        parts.append(optax.scale(-1.0))
        core = optax.chain(*parts)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if cfg.grad_clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
