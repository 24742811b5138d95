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
    n_experts: int = struct.field(pytree_node=False)  # E: the router's outputs, the experts

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
                 valid: Optional[jax.Array] = None,
                 selection_bias: Optional[jax.Array] = None) -> Routing:
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

    `selection_bias` [E] float32 (auxiliary-loss-free balancing, DeepSeek-V3) is added to the
    logits for choosing the experts only: steps 1-2 pick by logits + bias (the same order as
    probabilities when the bias is 0), while the gates stay the unbiased probabilities.
    """
    logits = logits.astype(jnp.float32)
    g, s, e = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    biased = logits if selection_bias is None else logits + selection_bias
    scores = probs if selection_bias is None else biased  # unbiased: probabilities' exact ties
    if top_k > 1 and policy == "sampling" and noise is not None:
        top1 = best_experts(scores, 1)
        rest = best_experts(biased + noise, top_k - 1, exclude=top1)
        index = jnp.concatenate([top1, rest], axis=-1)
    else:
        index = best_experts(scores, top_k)
    gates = jnp.take_along_axis(probs, index, axis=-1)
    normalised = gates / (gates.sum(-1, keepdims=True) + _EPS) if top_k > 1 else gates

    real = jnp.ones((g, s), bool) if valid is None else valid.astype(bool)
    attempted = jnp.broadcast_to(real[..., None], (g, s, top_k))
    if policy == "random" and noise is not None:
        attempted = attempted.at[..., 1:].set(attempted[..., 1:]
                                              & (top_k * normalised[..., 1:] > noise))

    position, demand = slot_positions(index, attempted, e, capacity)
    placed = position < capacity

    if gate_norm == "after" and top_k > 1:
        kept = jnp.where(placed, gates, 0.0)
        weight = kept / (kept.sum(-1, keepdims=True) + _EPS)
    else:
        weight = jnp.where(placed, normalised, 0.0)

    # Means over real tokens only; groups with no real token are left out of the mean.
    weight_s = real.astype(jnp.float32)
    n_real = weight_s.sum(axis=1)  # [G]
    per_token = weight_s / jnp.maximum(n_real, 1.0)[:, None]  # [G, S]
    # [G, E] share of real tokens whose top-1 is e: a segment sum, not a one-hot [G, S, E].
    density = jax.ops.segment_sum(per_token.reshape(-1),
                                  (jnp.arange(g)[:, None] * e + index[..., 0]).reshape(-1),
                                  num_segments=g * e).reshape(g, e)
    density_proxy = (probs * per_token[..., None]).sum(axis=1)  # [G, E] mean router probability of e
    group_aux = (density * density_proxy).sum(axis=-1) * e  # [G], 1 under perfect balance
    has_real = (n_real > 0).astype(jnp.float32)
    aux_loss = (group_aux * has_real).sum() / jnp.maximum(has_real.sum(), 1.0)
    z = jax.nn.logsumexp(logits, axis=-1) ** 2
    z_loss = (z * weight_s).sum() / jnp.maximum(weight_s.sum(), 1.0)

    stats = {**routing_stats(probs, demand, attempted, placed, real), "aux_loss": aux_loss}
    return Routing(expert_index=index, position=position, weight=weight, aux_loss=aux_loss,
                   z_loss=z_loss, stats=stats, capacity=capacity, n_experts=e)


def best_experts(scores: jax.Array, k: int, exclude: Optional[jax.Array] = None) -> jax.Array:
    """The k highest-scoring experts, best first; ties go to the lower expert index (as argmax).

    Args:
      scores: [G, S, E] float32.
      k: how many to pick.
      exclude: [G, S, J] int32 experts never picked (the top-1 when drawing the rest), or None.

    Returns: [G, S, k] int32.

    k rounds of (max, lowest index attaining it): O(k E) per token in plain reductions. XLA's
    CPU backend turns lax.top_k over E into a full sort of every token's E scores in some
    graphs (47 ms for 4096 tokens at E = 128 where these rounds take ~1 ms) and runs argmax
    several times slower than max.
    """
    expert = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    taken = (jnp.zeros(scores.shape, bool) if exclude is None else
             (expert == exclude[..., None]).any(-2))
    picks = []
    for _ in range(k):
        masked = jnp.where(taken, -jnp.inf, scores)
        best = masked.max(-1, keepdims=True)
        # min(..., E - 1): a NaN row matches no maximum; keep its index in range (the step's
        # loss is NaN anyway and the step is skipped).
        pick = jnp.minimum(jnp.min(jnp.where(masked == best, expert, scores.shape[-1]), axis=-1),
                           scores.shape[-1] - 1)
        picks.append(pick)
        taken = taken | (expert == pick[..., None])
    return jnp.stack(picks, axis=-1)


def slot_positions(index: jax.Array, attempted: jax.Array, n_experts: int,
                   capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each assignment's slot in its expert's buffer, filled rank by rank in token order.

    Args:
      index: [G, S, K] int32, the experts chosen, rank order.
      attempted: [G, S, K] bool, the assignments that ask for a slot (real tokens the policy
        keeps); the others take none.
      n_experts: E.
      capacity: C, slots per expert per group.

    Returns:
      position: [G, S, K] int32, the slot; == C where the assignment is not placed.
      demand: [G, E] int32, attempted assignments per expert (before capacity).

    A stable sort of the assignments by expert, in priority order (rank-major, then token),
    numbers each expert's queue; a slot is its place in that queue. That is GShard's rank-by-rank
    filling: the top-2 queue of an expert starts after its top-1 queue, which is also where it
    starts when capacity is filled rank by rank (once the top-1 queue reaches C, everything
    after it is dropped either way). Cost O(S K log(S K)) per group and O(E) for the queue
    starts, where per-rank cumulative sums over one-hot [G, S, E] tensors cost O(S K E).
    """
    g, s, k = index.shape
    # Priority order: all top-1 assignments in token order, then all top-2, ...
    expert = jnp.where(attempted, index, n_experts).transpose(0, 2, 1).reshape(g, k * s)
    order = jnp.argsort(expert, axis=-1, stable=True)
    queue = jnp.take_along_axis(expert, order, axis=-1)  # [G, K*S] expert of each sorted place
    # Queue lengths per (group, expert) as one segment sum; the sentinel E collects the rest.
    segment = (jnp.arange(g)[:, None] * (n_experts + 1) + expert).reshape(-1)
    counts = jax.ops.segment_sum(jnp.ones(g * k * s, jnp.int32), segment,
                                 num_segments=g * (n_experts + 1)).reshape(g, n_experts + 1)
    start = jnp.cumsum(counts, axis=-1) - counts
    in_queue = jnp.arange(k * s)[None, :] - jnp.take_along_axis(start, queue, axis=-1)
    rows = jnp.arange(g)[:, None]
    place = jnp.zeros((g, k * s), jnp.int32).at[rows, order].set(in_queue.astype(jnp.int32))
    place = place.reshape(g, k, s).transpose(0, 2, 1)
    position = jnp.where(attempted & (place < capacity), place, capacity).astype(jnp.int32)
    return position, counts[:, :n_experts]


def routing_stats(probs: jax.Array, demand: jax.Array, attempted: jax.Array,
                  placed: jax.Array, real: jax.Array) -> dict:
    """Health signals over the real tokens (`real` [G, S] bool): load per expert (from
    `demand` [G, E], attempted assignments per expert), dropped fractions, experts per token,
    router entropy.

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

    demand = demand.sum(axis=0).astype(jnp.float32)  # [E]; padding attempts nothing
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
