"""GShard top-k gating (Lepikhin et al. 2020, Algorithm 1) as pure functions on arrays.

Dimension letters, used in shapes and einsum strings alike:
G groups, S tokens per group, E experts, C expert capacity, K top-k, M model width.

`top_k_gating` turns router logits [G, S, E] into a `Routing`: for every token its K chosen
experts, its slot in each expert's buffer, and the combine weight of each assignment (0 where the
assignment was dropped), plus the auxiliary losses and health statistics. The dispatch itself
(moving activations into expert buffers) lives in `glam.model.moe`.

All router math is float32.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

_EPS = 1e-9


@struct.dataclass
class Routing:
    expert_index: jax.Array  # [G, S, K] int32: the k-th choice of each token, rank order
    position: jax.Array  # [G, S, K] int32: slot in the expert buffer; == capacity if not placed
    weight: jax.Array  # [G, S, K] float32: combine weight, 0 where not placed
    aux_loss: jax.Array  # scalar: GShard load-balancing loss, 1 under perfect balance
    z_loss: jax.Array  # scalar: mean logsumexp(logits)^2 (ST-MoE)
    stats: dict  # scalars plus "expert_load" [E]
    capacity: int = struct.field(pytree_node=False)

    @property
    def placed(self) -> jax.Array:
        """[G, S, K] bool: the assignment holds a slot in its expert's buffer."""
        return self.position < self.capacity


def expert_capacity(group_size: int, n_experts: int, top_k: int, capacity_factor: float,
                    multiple: int = 4) -> int:
    """Slots per expert per group: C = ceil(capacity_factor * K * S / E), rounded up to `multiple`.

    Convention: the K assignments of a token all count against capacity, so capacity_factor = 1
    gives exactly enough slots (E * C = K * S) for a perfectly balanced router. C never exceeds S,
    since a token occupies at most one slot per expert.
    """
    c = math.ceil(capacity_factor * top_k * group_size / n_experts)
    c = multiple * math.ceil(c / multiple)
    return max(1, min(group_size, c))


def second_expert_noise(key: Optional[jax.Array], policy: str, logits_shape: tuple,
                        top_k: int) -> Optional[jax.Array]:
    """The random draws a second-expert policy needs, or None when it needs none.

    `random`: uniforms [G, S, K-1], one per lower-ranked choice. `sampling`: Gumbel noise
    [G, S, E]; the lower-ranked experts are then the Gumbel-top-(K-1) of the logits without the
    top-1 expert, an exact sample without replacement from the router softmax.
    Without a key (evaluation), every policy falls back to deterministic `all`.
    """
    if key is None or policy == "all" or top_k == 1:
        return None
    g, s, e = logits_shape
    if policy == "random":
        return jax.random.uniform(key, (g, s, top_k - 1), jnp.float32)
    if policy == "sampling":
        return jax.random.gumbel(key, (g, s, e), jnp.float32)
    raise ValueError(f"unknown second_expert_policy {policy!r}")


def top_k_gating(logits: jax.Array, *, top_k: int, capacity: int, policy: str = "all",
                 gate_norm: str = "before", noise: Optional[jax.Array] = None,
                 valid: Optional[jax.Array] = None) -> Routing:
    """Route each token of each group to up to `top_k` experts with GShard semantics.

    1. probs = softmax(logits) in float32; the top-1 expert is argmax(probs).
    2. The lower-ranked experts are the next best by probability (`all`, `random`) or by
       Gumbel-perturbed logits (`sampling`). With K > 1 the K gates are normalised to sum to 1
       (`gate_norm="before"`, the reference) or, after capacity dropping, over the surviving
       assignments (`"after"`). With K = 1 the gate is the raw probability, as in Switch.
    3. `random` keeps a lower-ranked assignment only if K * gate > U(0, 1) (GShard: 2 * g2 > U).
    4. Slots are given rank by rank: all top-1 assignments first, in token order, then the top-2
       assignments starting after the accepted top-1 count, and so on. An assignment whose slot
       would be >= capacity is dropped.

    `valid` [G, S] bool marks real tokens. Padding has no effect on anything computed here: it
    is routed nowhere, takes no capacity, and is left out of the auxiliary losses and every
    statistic (which average over real tokens only).
    """
    logits = logits.astype(jnp.float32)
    g, s, e = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    top1 = jnp.argmax(probs, axis=-1)
    top1_mask = jax.nn.one_hot(top1, e, dtype=jnp.float32)

    if top_k > 1:
        scores = logits + noise if policy == "sampling" and noise is not None else probs
        _, rest = jax.lax.top_k(jnp.where(top1_mask > 0, -jnp.inf, scores), top_k - 1)
        index = jnp.concatenate([top1[..., None], rest], axis=-1).astype(jnp.int32)
    else:
        index = top1[..., None].astype(jnp.int32)
    gates = jnp.take_along_axis(probs, index, axis=-1)
    normalised = gates / (gates.sum(-1, keepdims=True) + _EPS) if top_k > 1 else gates

    real = jnp.ones((g, s), bool) if valid is None else valid.astype(bool)
    attempted = jnp.broadcast_to(real[..., None], (g, s, top_k))
    if policy == "random" and noise is not None:
        attempted = attempted.at[..., 1:].set(attempted[..., 1:]
                                              & (top_k * normalised[..., 1:] > noise))

    onehot = jax.nn.one_hot(index, e, dtype=jnp.int32) * attempted[..., None]  # [G, S, K, E]
    filled = jnp.zeros((g, e), jnp.int32)
    positions = []
    for rank in range(top_k):
        mask = onehot[:, :, rank]  # [G, S, E]
        pos = jnp.cumsum(mask, axis=1) - mask + filled[:, None, :]
        pos = (pos * mask).sum(-1)  # [G, S]
        placed = attempted[:, :, rank] & (pos < capacity)
        filled = filled + (mask * placed[..., None]).sum(1)
        positions.append(jnp.where(placed, pos, capacity))
    position = jnp.stack(positions, axis=-1).astype(jnp.int32)
    placed = position < capacity

    if gate_norm == "after" and top_k > 1:
        kept = jnp.where(placed, gates, 0.0)
        weight = kept / (kept.sum(-1, keepdims=True) + _EPS)
    else:
        weight = jnp.where(placed, normalised, 0.0)

    # Means over real tokens only; groups with no real token are left out of the mean.
    weight_s = real.astype(jnp.float32)
    n_real = weight_s.sum(axis=1)  # [G]
    per_token = weight_s[..., None] / jnp.maximum(n_real, 1.0)[:, None, None]
    density = (top1_mask * per_token).sum(axis=1)  # [G, E] share of real tokens with top-1 e
    density_proxy = (probs * per_token).sum(axis=1)  # [G, E] mean router probability of e
    group_aux = (density * density_proxy).sum(axis=-1) * e  # [G], 1 under perfect balance
    has_real = (n_real > 0).astype(jnp.float32)
    aux_loss = (group_aux * has_real).sum() / jnp.maximum(has_real.sum(), 1.0)
    z = jax.nn.logsumexp(logits, axis=-1) ** 2
    z_loss = (z * weight_s).sum() / jnp.maximum(weight_s.sum(), 1.0)

    stats = {**routing_stats(probs, onehot, attempted, placed, real), "aux_loss": aux_loss}
    return Routing(expert_index=index, position=position, weight=weight, aux_loss=aux_loss,
                   z_loss=z_loss, stats=stats, capacity=capacity)


def routing_stats(probs: jax.Array, onehot: jax.Array, attempted: jax.Array,
                  placed: jax.Array, real: jax.Array) -> dict:
    """Health signals over the real tokens (`real` [G, S] bool): load per expert, dropped
    fractions, experts per token, router entropy.

    `expert_load[e]` is expert e's demand (assignments before capacity) as a multiple of its fair
    share, so a balanced router gives all ones. `dropped_top1` is the fraction of top-1
    assignments that found no slot; `dropped_top2` the same for the lower-ranked assignments that
    the policy tried to place. `routed_n` is the fraction of tokens placed in exactly n experts.
    """
    e = probs.shape[-1]
    top_k = placed.shape[-1]
    n_real = jnp.maximum(real.sum(), 1)

    def mean_over_real(x):  # x [G, S]
        return jnp.sum(jnp.where(real, x, 0).astype(jnp.float32)) / n_real

    demand = onehot.sum(axis=(0, 1, 2)).astype(jnp.float32)  # [E]; padding attempts nothing
    stats = {
        "expert_load": demand * e / jnp.maximum(demand.sum(), 1.0),
        "dropped_top1": mean_over_real(~placed[..., 0]),
        "router_entropy": mean_over_real(-jnp.sum(probs * jnp.log(probs + _EPS), axis=-1)),
    }
    if top_k > 1:
        tried = attempted[..., 1:].sum()
        stats["dropped_top2"] = (tried - placed[..., 1:].sum()) / jnp.maximum(tried, 1)
    n_placed = placed.sum(-1)
    for n in range(top_k + 1):
        stats[f"routed_{n}"] = mean_over_real(n_placed == n)
    return stats
