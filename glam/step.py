"""The loss and the pure jitted train/eval steps over NNX state."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glam.config import ModelConfig
from glam.mesh import state_shardings
from glam.model import GLaM, MoEOutputs
from glam.model.moe import update_router_bias


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh, rules):
    """A fresh model and optimizer as (graphdef, model graphdef, state, state sharding), the
    state placed on `mesh` by the logical axes its parameters declared and the table `rules`.
    `cfg` is a resolved model config (`glam.resolve`). Parameters are float32 (embedding
    [V, M], attention [M, N, D] / [N, D, M], FFN [M, F] / [F, M], experts [E, M, H] / [E, H, M]).

    The state is created inside one jitted function whose outputs carry their shardings, so every
    array is born in its global layout (a host copy placed afterwards is not a valid global
    array when each process has a single device).

    Raises:
      ValueError: a parameter without declared axes (`glam.mesh.state_shardings`).
    """

    def create(key):
        model = GLaM(cfg, rngs=nnx.Rngs(key))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    key = jax.random.key(seed)
    abstract_model, abstract_optimizer = nnx.eval_shape(create, key)
    model_graphdef, _ = nnx.split(abstract_model)
    graphdef, abstract_state = nnx.split((abstract_model, abstract_optimizer))
    sharding = state_shardings(abstract_state, mesh, rules)
    # The key is an argument, not a constant: one program for every seed (compilation cache).
    state = jax.jit(lambda key: nnx.state(create(key)), out_shardings=sharding)(key)
    return graphdef, model_graphdef, state, sharding


def next_token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T], log-normaliser logsumexp(logits) [B, T]), float32."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked, log_z


def inputs(tokens: jax.Array, segment_ids: jax.Array | None):
    """The model's inputs of a [B, T+1] window batch: tokens[:, :-1] and their segment ids."""
    return tokens[:, :-1], None if segment_ids is None else segment_ids[:, :-1]


def loss_fn(model: GLaM, tokens: jax.Array, key, cfg: ModelConfig, scale=1.0,
            segment_ids: jax.Array | None = None):
    """Next-token cross-entropy + aux_loss_weight * aux + z_loss_weight * z (router) +
    output_z_loss_weight * mean(logsumexp(logits)^2) (the output softmax's z-loss, GLaM's
    reference code), all float32. `scale` multiplies the LM loss: 1 except under fault
    injection (NaN, or a spike). `segment_ids` [B, T+1]: attention stays within documents."""
    x, segments = inputs(tokens, segment_ids)
    logits, moe = model(x, key, segment_ids=segments)
    nll, log_z = next_token_nll(logits, tokens[:, 1:])
    lm_loss = nll.mean() * scale
    output_z = jnp.mean(jnp.square(log_z))
    r = cfg.router
    total = (lm_loss + r.aux_loss_weight * moe.aux_loss + r.z_loss_weight * moe.z_loss
             + cfg.output_z_loss_weight * output_z)
    return total, (lm_loss, output_z, moe)


def moe_metrics(moe: MoEOutputs, model: GLaM) -> dict[str, jax.Array]:
    """Per-step scalars: router losses (summed over MoE layers, as added to the loss) and each
    MoE layer's health signals (its own aux loss reads 1 under perfect balance): `load_max`,
    the busiest expert's load over the mean, and `load_violation`, that less 1 (MaxVio, Wang et
    al. 2024: 0 when balanced); with bias balancing, the spread of its biases."""
    out = {"aux_loss": moe.aux_loss, "z_loss": moe.z_loss}
    for layer, stats in moe.layer_stats.items():
        for name, value in stats.items():
            if name == "expert_load":
                out[f"moe/layer{layer}/load_max"] = value.max()
                out[f"moe/layer{layer}/load_violation"] = value.max() - 1.0
            else:
                out[f"moe/layer{layer}/{name}"] = value
        ffn = model.blocks[layer].ffn
        if hasattr(ffn, "bias"):
            out[f"moe/layer{layer}/bias_range"] = ffn.bias[...].max() - ffn.bias[...].min()
    return out


def balance_routers(model: GLaM, moe: MoEOutputs, rate: float) -> None:
    """Move each bias-balanced MoE layer's selection biases by the step's expert loads
    (`update_router_bias`), in place."""
    for layer, stats in moe.layer_stats.items():
        ffn = model.blocks[layer].ffn
        if hasattr(ffn, "bias"):
            ffn.bias[...] = update_router_bias(ffn.bias[...], stats["expert_load"], rate)


def all_finite(tree) -> jax.Array:
    """Scalar bool: every floating-point array of `tree` is finite everywhere."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.array(True)


def make_train_step(graphdef: nnx.GraphDef, cfg: ModelConfig, schedule: optax.Schedule,
                    state_sharding=None, data_sharding=None) -> Callable:
    """(state, tokens [B, T+1] int32, key, fault scale float32, segment ids [B, T+1] int32 or
    None) -> (state, metrics), where
    `state` is nnx.state((model, opt)). A step whose loss, gradients or resulting state
    (parameters and optimizer moments: an infinite learning rate turns finite gradients into
    non-finite weights) are not all finite leaves the state unchanged (`skipped` = 1), decided
    on device: no host synchronisation, and no non-finite weights ever reach a checkpoint."""

    def train_step(state, tokens, key, scale, segment_ids=None):
        # copy=True: without it the merged Variables alias `state`, and the update would
        # overwrite the values a skipped step must keep.
        model, opt = nnx.merge(graphdef, state, copy=True)
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, (lm_loss, output_z, moe)), grads = grad_fn(model, tokens, key, cfg, scale,
                                                          segment_ids)
        grad_norm = optax.tree.norm(grads)
        learning_rate = schedule(opt.step[...])
        opt.update(model, grads)
        balance_routers(model, moe, cfg.router.bias_rate)
        updated = nnx.state((model, opt))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updated)
        metrics = {"loss": loss, "lm_loss": lm_loss, "output_z_loss": output_z,
                   "grad_norm": grad_norm,
                   "learning_rate": learning_rate, "skipped": (~finite).astype(jnp.int32),
                   **moe_metrics(moe, model)}
        return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state), metrics

    jitted = jax.jit(train_step, donate_argnums=0,
                     in_shardings=(state_sharding, data_sharding, None, None, data_sharding),
                     out_shardings=(state_sharding, None))
    return lambda state, tokens, key, scale, segment_ids=None: jitted(state, tokens, key, scale,
                                                                      segment_ids)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """(model state, tokens [B, T+1], segment ids [B, T+1] or None) -> (summed next-token NLL,
    token count, expert load per MoE layer); routing is deterministic."""

    def eval_step(state, tokens, segment_ids=None):
        model = nnx.merge(graphdef, state)
        x, segments = inputs(tokens, segment_ids)
        logits, moe = model(x, segment_ids=segments)
        nll, _ = next_token_nll(logits, tokens[:, 1:])
        loads = {layer: stats["expert_load"] for layer, stats in moe.layer_stats.items()}
        return nll.sum(), jnp.asarray(nll.size, jnp.float32), loads

    return jax.jit(eval_step)
