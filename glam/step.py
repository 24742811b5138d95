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

    def create():
        model = GLaM(cfg, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    abstract_model, abstract_optimizer = nnx.eval_shape(create)
    model_graphdef, _ = nnx.split(abstract_model)
    graphdef, abstract_state = nnx.split((abstract_model, abstract_optimizer))
    sharding = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=sharding)()
    return graphdef, model_graphdef, state, sharding


def loss_fn(model: GLaM, tokens: jax.Array, key, cfg: ModelConfig, scale=1.0):
    """Next-token cross-entropy + aux_loss_weight * aux + z_loss_weight * z, all float32.
    `scale` multiplies the LM loss: 1 except under fault injection (NaN, or a spike)."""
    logits, moe = model(tokens[:, :-1], key)
    lm_loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean() * scale
    r = cfg.router
    total = lm_loss + r.aux_loss_weight * moe.aux_loss + r.z_loss_weight * moe.z_loss
    return total, (lm_loss, moe)


def moe_metrics(moe: MoEOutputs) -> dict[str, jax.Array]:
    """Per-step scalars: router losses (summed over MoE layers, as added to the loss) and each
    MoE layer's health signals (its own aux loss reads 1 under perfect balance)."""
    out = {"aux_loss": moe.aux_loss, "z_loss": moe.z_loss}
    for layer, stats in moe.layer_stats.items():
        for name, value in stats.items():
            if name == "expert_load":
                out[f"moe/layer{layer}/load_max"] = value.max()
            else:
                out[f"moe/layer{layer}/{name}"] = value
    return out


def all_finite(tree) -> jax.Array:
    """Scalar bool: every floating-point array of `tree` is finite everywhere."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.array(True)


def make_train_step(graphdef: nnx.GraphDef, cfg: ModelConfig, schedule: optax.Schedule,
                    state_sharding=None, data_sharding=None) -> Callable:
    """(state, tokens [B, T+1] int32, key, fault scale float32) -> (state, metrics), where
    `state` is nnx.state((model, opt)). A step whose loss, gradients or resulting state
    (parameters and optimizer moments: an infinite learning rate turns finite gradients into
    non-finite weights) are not all finite leaves the state unchanged (`skipped` = 1), decided
    on device: no host synchronisation, and no non-finite weights ever reach a checkpoint."""

    def train_step(state, tokens, key, scale):
        # copy=True: without it the merged Variables alias `state`, and the update would
        # overwrite the values a skipped step must keep.
        model, opt = nnx.merge(graphdef, state, copy=True)
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, (lm_loss, moe)), grads = grad_fn(model, tokens, key, cfg, scale)
        grad_norm = optax.tree.norm(grads)
        learning_rate = schedule(opt.step[...])
        opt.update(model, grads)
        updated = nnx.state((model, opt))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updated)
        metrics = {"loss": loss, "lm_loss": lm_loss, "grad_norm": grad_norm,
                   "learning_rate": learning_rate, "skipped": (~finite).astype(jnp.int32),
                   **moe_metrics(moe)}
        return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state), metrics

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_sharding, data_sharding, None, None),
                   out_shardings=(state_sharding, None))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """(model state, tokens [B, T+1]) -> (summed next-token NLL, token count, expert load per
    MoE layer); routing is deterministic."""

    def eval_step(state, tokens):
        model = nnx.merge(graphdef, state)
        logits, moe = model(tokens[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        loads = {layer: stats["expert_load"] for layer, stats in moe.layer_stats.items()}
        return nll.sum(), jnp.asarray(nll.size, jnp.float32), loads

    return jax.jit(eval_step)
