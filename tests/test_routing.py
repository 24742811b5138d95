"""Routing and both dispatch paths against a slow loop-over-tokens NumPy reference."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam.model.moe import DISPATCH, ExpertWeights, dispatch_combine_tensors
from glam.model.routing import expert_capacity, second_expert_noise, top_k_gating


def _gelu(x):
    """tanh-approximate GELU, as jax.nn.gelu computes by default."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_moe(x, logits, w_in, w_out, *, top_k, capacity, policy, gate_norm, noise,
                  valid=None, w_gate=None, bias=None):
    """Route token by token, fill expert slots rank by rank, sum the gated expert outputs
    (GELU experts, or GeGLU with `w_gate`). A selection `bias` [E] is added to the logits for
    choosing experts only. Returns the output, the slot of every assignment (-1: not placed) and
    the router losses and statistics, computed by counting."""
    x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
    chooser = logits if bias is None else logits + np.asarray(bias, np.float64)
    noise = None if noise is None else np.asarray(noise, np.float64)
    g_count, s_count, e_count = logits.shape
    out = np.zeros_like(x)
    slots = np.full((g_count, s_count, top_k), -1)
    demand = np.zeros(e_count)
    tried_lower = placed_lower = 0
    aux = 0.0
    for g in range(g_count):
        probs = np.exp(logits[g] - logits[g].max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen, gates, attempted = [], [], []
        for s in range(s_count):
            first = int(np.argmax(probs[s] if bias is None else chooser[g, s]))
            scores = (chooser[g, s] + noise[g, s] if policy == "sampling" and noise is not None
                      else probs[s] if bias is None else chooser[g, s])
            rest = [int(e) for e in np.argsort(-scores, kind="stable") if e != first][: top_k - 1]
            experts = [first] + rest
            gate = probs[s, experts]
            norm = gate / gate.sum() if top_k > 1 else gate
            tried = [True if valid is None else bool(valid[g, s])] + [
                (top_k * norm[r] > noise[g, s, r - 1]) if policy == "random" and noise is not None else True
                for r in range(1, top_k)
            ]
            tried = [t and tried[0] for t in tried]
            chosen.append(experts), gates.append((gate, norm)), attempted.append(tried)
        real = np.ones(s_count, bool) if valid is None else np.asarray(valid[g], bool)
        if real.any():  # the aux loss counts real tokens, averaged over groups that have some
            top1_count = np.bincount([c[0] for s, c in enumerate(chosen) if real[s]],
                                     minlength=e_count)
            n_real = real.sum()
            groups_with_real = g_count if valid is None else int(np.asarray(valid).any(1).sum())
            aux += np.sum(top1_count / n_real * probs[real].mean(0)) * e_count / groups_with_real
        filled = np.zeros(e_count, int)
        placed = np.zeros((s_count, top_k), bool)
        for r in range(top_k):
            for s in range(s_count):
                e = chosen[s][r]
                if not attempted[s][r]:
                    continue
                demand[e] += 1
                if filled[e] < capacity:
                    placed[s, r] = True
                    slots[g, s, r] = filled[e]
                    filled[e] += 1
                if r > 0:
                    tried_lower += 1
                    placed_lower += placed[s, r]
        for s in range(s_count):
            gate, norm = gates[s]
            if gate_norm == "after" and top_k > 1:
                kept = gate * placed[s]
                weight = kept / (kept.sum() + 1e-9)
            else:
                weight = norm * placed[s]
            for r, e in enumerate(chosen[s]):
                if placed[s, r]:
                    h = (_gelu(x[g, s] @ w_in[e]) if w_gate is None
                         else _gelu(x[g, s] @ w_gate[e]) * (x[g, s] @ w_in[e]))
                    out[g, s] += weight[r] * (h @ w_out[e])
    stats = {"aux_loss": aux, "expert_load": demand * e_count / demand.sum(),
             "dropped_top2": (tried_lower - placed_lower) / max(tried_lower, 1)}
    return out, slots, stats


# One compilation per case instead of one per primitive per shape (eager mode).
_jit_gating = jax.jit(top_k_gating, static_argnames=("top_k", "capacity", "policy", "gate_norm"))

CASES = [
    # (S, E, K, capacity_factor, capacity_multiple, policy, gate_norm, skew)
    (16, 4, 2, 1.25, 4, "all", "before", 0.0),
    (16, 4, 2, 0.5, 1, "all", "before", 0.0),
    (16, 4, 2, 0.25, 1, "all", "after", 3.0),
    (24, 8, 2, 1.0, 1, "random", "before", 0.0),
    (24, 8, 2, 0.5, 1, "random", "after", 2.0),
    (16, 8, 2, 2.0, 4, "sampling", "before", 0.0),
    (16, 8, 2, 0.5, 1, "sampling", "after", 4.0),
    (12, 3, 1, 1.0, 1, "all", "before", 0.0),
    (12, 3, 1, 0.5, 1, "all", "before", 3.0),
    (16, 8, 3, 0.75, 1, "random", "before", 1.0),
    (16, 8, 3, 0.5, 2, "sampling", "after", 0.0),
    (8, 2, 2, 4.0, 4, "all", "before", 0.0),
    (32, 16, 2, 1.25, 4, "all", "before", 5.0),
    (32, 16, 4, 1.0, 1, "all", "before", 2.0),  # granularity 2 of E = 8, K = 2
]


@pytest.mark.parametrize("dispatch", [pytest.param(d, marks=pytest.mark.slow)
                                      if d == "dropless" else d for d in sorted(DISPATCH)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_dispatch_matches_reference(case, dispatch, seed=0):
    s, e, k, cf, mult, policy, gate_norm, skew = case
    g, m, h = 2, 8, 16
    keys = jax.random.split(jax.random.key(zlib.crc32(repr(case).encode()) + seed), 5)
    x = jax.random.normal(keys[0], (g, s, m))
    logits = jax.random.normal(keys[1], (g, s, e)) * 2.0
    logits = logits.at[..., 0].add(skew)  # skew > 0: expert 0 overflows
    w_in = jax.random.normal(keys[2], (e, m, h)) / np.sqrt(m)
    w_out = jax.random.normal(keys[3], (e, h, m)) / np.sqrt(h)
    capacity = expert_capacity(s, e, k, cf, mult)
    noise = second_expert_noise(keys[4], policy, logits.shape, k)

    routing = _jit_gating(logits, top_k=k, capacity=capacity, policy=policy,
                          gate_norm=gate_norm, noise=noise)
    got = jax.jit(DISPATCH[dispatch])(x, routing, ExpertWeights(w_in, w_out))
    want, slots, want_stats = reference_moe(x, logits, np.asarray(w_in), np.asarray(w_out), top_k=k,
                                 capacity=capacity, policy=policy, gate_norm=gate_norm,
                                 noise=noise)
    placed = slots >= 0
    np.testing.assert_array_equal(np.where(routing.placed, routing.position, -1), slots)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    assert float(routing.aux_loss) == pytest.approx(want_stats["aux_loss"], rel=1e-5)
    np.testing.assert_allclose(routing.stats["expert_load"], want_stats["expert_load"], rtol=1e-5)
    if k > 1:
        assert float(routing.stats["dropped_top2"]) == pytest.approx(want_stats["dropped_top2"], abs=1e-6)

    n_placed = placed.sum(-1)
    for n in range(k + 1):
        assert float(routing.stats[f"routed_{n}"]) == pytest.approx(np.mean(n_placed == n), abs=1e-6)
    assert float(routing.stats["dropped_top1"]) == pytest.approx(np.mean(~placed[..., 0]), abs=1e-6)


@pytest.mark.parametrize("dispatch", sorted(DISPATCH))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("policy", ["all", "sampling"])
def test_geglu_experts_and_a_selection_bias_match_the_reference(dispatch, padded, policy):
    """GeGLU experts (upcycling's form) and an aux-loss-free selection bias, on every path, with
    and without padding: the bias changes which experts are chosen, never the gates."""
    g, s, e, k, m, h = 2, 16, 8, 2, 8, 16
    keys = jax.random.split(jax.random.key(5), 8)
    x = jax.random.normal(keys[0], (g, s, m))
    logits = jax.random.normal(keys[1], (g, s, e)) * 2.0
    w_in, w_gate = (jax.random.normal(key, (e, m, h)) / np.sqrt(m) for key in keys[2:4])
    w_out = jax.random.normal(keys[4], (e, h, m)) / np.sqrt(h)
    bias = jax.random.normal(keys[5], (e,)) * 2.0
    valid = jax.random.uniform(keys[6], (g, s)) > 0.3 if padded else None
    capacity = expert_capacity(s, e, k, 1.0, 1)
    noise = second_expert_noise(keys[7], policy, logits.shape, k)
    routing = _jit_gating(logits, top_k=k, capacity=capacity, policy=policy, gate_norm="before",
                          noise=noise, valid=valid, selection_bias=bias)
    got = jax.jit(DISPATCH[dispatch])(x, routing, ExpertWeights(w_in, w_out, w_gate))
    want, slots, stats = reference_moe(
        x, logits, *(np.asarray(w) for w in (w_in, w_out)), top_k=k, capacity=capacity,
        policy=policy, gate_norm="before", noise=noise,
        valid=None if valid is None else np.asarray(valid), w_gate=np.asarray(w_gate),
        bias=np.asarray(bias))
    np.testing.assert_array_equal(np.where(routing.placed, routing.position, -1), slots)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(routing.stats["expert_load"], stats["expert_load"], rtol=1e-5)
    unbiased = _jit_gating(logits, top_k=k, capacity=capacity, policy=policy,
                           gate_norm="before", noise=noise, valid=valid)
    assert np.any(np.asarray(routing.expert_index) != np.asarray(unbiased.expert_index))


def test_overflow_cases_really_drop():
    """The reference comparison above covers heavy overflow, not only the easy regime."""
    logits = jnp.zeros((1, 16, 4)).at[..., 0].add(5.0)
    routing = top_k_gating(logits, top_k=2, capacity=expert_capacity(16, 4, 2, 0.5, 1))
    assert float(routing.stats["dropped_top1"]) > 0.5
    assert float(routing.stats["routed_0"]) > 0.5


def test_capacity_convention():
    assert expert_capacity(1024, 64, 2, 1.0, 1) == 32  # E * C == K * S at factor 1
    assert expert_capacity(1024, 64, 2, 1.25, 4) == 40
    assert expert_capacity(100, 64, 2, 1.25, 4) == 4  # ceil(3.9) = 4
    assert expert_capacity(10, 2, 2, 8.0, 4) == 10  # never more than S


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, None], ids=["drops", "cf1", "dropless"])
def test_gradients_of_every_path_equal_the_einsum_reference(capacity_factor):
    """Gradients for the input, router and expert weights: the gather path (whose transposes
    are gathers, `gather_rows`) and the dropless path equal autodiff through the one-hot einsum
    reference, with dropped assignments, empty slots and padding tokens."""
    g, s, m, e, h, k = 2, 16, 8, 4, 16, 2
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (g, s, m))
    w_router = jax.random.normal(keys[1], (m, e))
    w_in = jax.random.normal(keys[2], (e, m, h)) / np.sqrt(m)
    w_out = jax.random.normal(keys[3], (e, h, m)) / np.sqrt(h)
    target = jax.random.normal(keys[4], (g, s, m))
    valid = jax.random.uniform(keys[5], (g, s)) > 0.25
    capacity = s if capacity_factor is None else expert_capacity(s, e, k, capacity_factor, 1)

    def loss(params, dispatch):
        x, w_router, w_in, w_out = params
        routing = top_k_gating((x @ w_router).at[..., 0].add(1.0), top_k=k, capacity=capacity,
                               valid=valid)
        y = DISPATCH[dispatch](x, routing, ExpertWeights(w_in, w_out))
        return jnp.sum(y * target) + 0.01 * routing.aux_loss

    params = (x, w_router, w_in, w_out)
    paths = ["gather", "einsum"] + (["dropless"] if capacity_factor is None else [])
    grads = {d: jax.jit(jax.grad(loss), static_argnums=1)(params, d) for d in paths}
    for d in paths:
        for name, got, want in zip(("x", "router", "w_in", "w_out"), grads[d], grads["einsum"]):
            assert float(jnp.abs(got).sum()) > 0, (d, name)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{d} {name}")


@pytest.mark.slow
def test_ragged_dot_branch_of_dropless_equals_the_blocked_cpu_form():
    """The GPU/TPU branch (`jax.lax.ragged_dot`), forced on CPU, equals the blocked form: outputs
    within 1e-6, gradients within 1e-5, with uneven experts and padding."""
    from glam.model.moe import moe_dropless

    g, s, m, e, h, k = 2, 24, 8, 8, 16, 2
    keys = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(keys[0], (g, s, m))
    logits = (jax.random.normal(keys[1], (g, s, e)) * 2).at[..., 3].add(2.0)
    w_in = jax.random.normal(keys[2], (e, m, h)) / np.sqrt(m)
    w_out = jax.random.normal(keys[3], (e, h, m)) / np.sqrt(h)
    valid = jax.random.uniform(keys[4], (g, s)) > 0.2
    routing = _jit_gating(logits, top_k=k, capacity=s, policy="all", gate_norm="before",
                          noise=None, valid=valid)

    def run(x, w_in, w_out, ragged):
        return moe_dropless(x, routing, ExpertWeights(w_in, w_out), block=8, ragged=ragged)

    outs = {r: jax.jit(run, static_argnums=3)(x, w_in, w_out, r) for r in (True, False)}
    np.testing.assert_allclose(outs[True], outs[False], atol=1e-6)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) ** 2), argnums=(0, 1, 2)),
                   static_argnums=3)
    for got, want in zip(grad(x, w_in, w_out, True), grad(x, w_in, w_out, False)):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_best_experts_equal_a_stable_descending_sort(k):
    """`best_experts` picks what a stable sort by descending score picks (ties to the lower
    expert index), also with ties and with excluded experts."""
    from glam.model.routing import best_experts

    scores = jnp.round(jax.random.normal(jax.random.key(k), (3, 20, 6)) * 2) / 2  # many ties
    order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")
    np.testing.assert_array_equal(best_experts(scores, k), order[..., :k])
    exclude = order[..., :1].astype(np.int32)
    np.testing.assert_array_equal(best_experts(scores, k, exclude=jnp.asarray(exclude)),
                                  order[..., 1:k + 1])
    # A NaN row (a diverged step) still names experts in range, never E.
    picked = best_experts(scores.at[0, 0].set(jnp.nan), k)
    assert int(picked.max()) < scores.shape[-1]


def test_dispatch_tensors_are_one_hot_per_placed_assignment():
    logits = jax.random.normal(jax.random.key(3), (2, 16, 4))
    routing = top_k_gating(logits, top_k=2, capacity=6)
    dispatch, combine = dispatch_combine_tensors(routing)
    assert float(dispatch.sum()) == float(routing.placed.sum())
    assert float(dispatch.sum(axis=1).max()) == 1.0  # each slot holds at most one token
    np.testing.assert_allclose(combine.sum(axis=(2, 3)), routing.weight.sum(-1), rtol=1e-6)


def test_aux_loss_is_one_under_perfect_balance_and_larger_when_imbalanced():
    s, e = 32, 8
    # Tokens cycle over experts for both their first and second choice.
    balanced = (10.0 * jax.nn.one_hot(jnp.arange(s) % e, e)
                + 5.0 * jax.nn.one_hot((jnp.arange(s) + 1) % e, e))[None]
    routing = top_k_gating(balanced, top_k=2, capacity=8)
    assert float(routing.aux_loss) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(routing.stats["expert_load"], np.ones(e), atol=1e-6)

    skewed = jnp.zeros((1, s, e)).at[..., 0].set(3.0)
    imbalanced = top_k_gating(skewed, top_k=2, capacity=8)
    assert float(imbalanced.aux_loss) > 2.0
    assert float(imbalanced.stats["expert_load"][0]) > 1.0


def test_z_loss_value():
    logits = jax.random.normal(jax.random.key(1), (2, 8, 4)) * 3
    routing = top_k_gating(logits, top_k=2, capacity=8)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    assert float(routing.z_loss) == pytest.approx(np.mean(lse**2), rel=1e-5)


def test_router_entropy_and_policies_without_key_are_deterministic():
    logits = jax.random.normal(jax.random.key(2), (1, 16, 8))
    for policy in ("all", "random", "sampling"):
        noise = second_expert_noise(None, policy, logits.shape, 2)
        assert noise is None
    routing = top_k_gating(logits, top_k=2, capacity=16)
    p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    assert float(routing.stats["router_entropy"]) == pytest.approx(
        np.mean(-(p * np.log(p)).sum(-1)), rel=1e-5)


def test_random_policy_drops_some_second_choices():
    logits = jax.random.normal(jax.random.key(4), (4, 64, 8))
    noise = second_expert_noise(jax.random.key(5), "random", logits.shape, 2)
    routing = top_k_gating(logits, top_k=2, capacity=64, policy="random", noise=noise)
    assert 0.0 < float(routing.stats["routed_1"]) < 1.0
    assert float(routing.stats["routed_0"]) == 0.0


@pytest.mark.parametrize("k,policy", list(itertools.product([1, 2], ["all", "random", "sampling"])))
def test_weights_sum_to_one_without_drops(k, policy):
    logits = jax.random.normal(jax.random.key(6), (2, 16, 4))
    noise = second_expert_noise(jax.random.key(7), policy, logits.shape, k)
    routing = top_k_gating(logits, top_k=k, capacity=16, policy=policy, noise=noise)
    total = np.asarray(routing.weight.sum(-1))
    if k == 2 and policy == "all":
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    if k == 2 and policy == "random":  # a token whose second choice was not kept weighs < 1
        assert np.all(total <= 1 + 1e-6) and np.any(total < 1 - 1e-3)
    if k == 2 and policy == "sampling":  # the second choice is sampled: not always the runner-up
        runner_up = np.argsort(-np.asarray(logits), axis=-1)[..., 1]
        assert np.any(np.asarray(routing.expert_index[..., 1]) != runner_up)
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    if k == 1:  # Switch-style: the gate is the router probability itself
        np.testing.assert_allclose(routing.weight[..., 0], jax.nn.softmax(logits, -1).max(-1), rtol=1e-6)


@pytest.mark.parametrize("dispatch", sorted(DISPATCH))
def test_padding_takes_no_capacity(dispatch):
    g, s, e, k, m, h = 2, 16, 4, 2, 8, 16
    keys = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(keys[0], (g, s, m))
    logits = jax.random.normal(keys[1], (g, s, e)).at[..., 0].add(2.0)
    w_in = jax.random.normal(keys[2], (e, m, h)) / np.sqrt(m)
    w_out = jax.random.normal(keys[3], (e, h, m)) / np.sqrt(h)
    valid = jax.random.uniform(keys[4], (g, s)) > 0.4
    capacity = expert_capacity(s, e, k, 0.5, 1)
    routing = _jit_gating(logits, top_k=k, capacity=capacity, policy="all", gate_norm="before",
                          noise=None, valid=valid)
    got = jax.jit(DISPATCH[dispatch])(x, routing, ExpertWeights(w_in, w_out))
    want, slots, _ = reference_moe(x, logits, np.asarray(w_in), np.asarray(w_out), top_k=k,
                                   capacity=capacity, policy="all", gate_norm="before",
                                   noise=None, valid=np.asarray(valid))
    np.testing.assert_array_equal(np.where(routing.placed, routing.position, -1), slots)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    assert not np.any(np.asarray(routing.placed)[~np.asarray(valid)])


@pytest.mark.slow
@pytest.mark.parametrize("e,k,block", [(4, 2, 4), (8, 2, 8), (16, 1, 4), (8, 3, 64)])
def test_dropless_equals_capacity_routing_when_nothing_drops(e, k, block):
    """Dropless dispatch (blocked grouped matmuls on CPU) equals the reference and the
    gather path when capacity is large enough that nothing drops; also with padding."""
    from glam.model.moe import moe_dropless

    g, s, m, h = 2, 24, 8, 16
    keys = jax.random.split(jax.random.key(e * 10 + k), 5)
    x = jax.random.normal(keys[0], (g, s, m))
    logits = (jax.random.normal(keys[1], (g, s, e)) * 2).at[..., 0].add(1.5)  # uneven groups
    w_in = jax.random.normal(keys[2], (e, m, h)) / np.sqrt(m)
    w_out = jax.random.normal(keys[3], (e, h, m)) / np.sqrt(h)
    valid = jax.random.uniform(keys[4], (g, s)) > 0.2
    routing = _jit_gating(logits, top_k=k, capacity=s, policy="all", gate_norm="before",
                          noise=None, valid=valid)
    got = jax.jit(moe_dropless, static_argnames="block")(x, routing, ExpertWeights(w_in, w_out), block=block)
    want, _, _ = reference_moe(x, logits, np.asarray(w_in), np.asarray(w_out), top_k=k,
                               capacity=s, policy="all", gate_norm="before", noise=None,
                               valid=np.asarray(valid))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, DISPATCH["gather"](x, routing, ExpertWeights(w_in, w_out)), atol=2e-5)


def test_the_issue_example_padding_takes_nothing_from_real_tokens():
    """4 padding + 4 real tokens, 4 experts, top-2, 2 slots each, every token preferring experts 0
    then 1, `random` with draws that keep every second choice: padding is placed nowhere and
    every real token keeps both of its experts' slots where capacity allows."""
    logits = jnp.tile(jnp.array([3.0, 2.0, 0.0, -1.0]), (1, 8, 1))
    valid = jnp.array([[False] * 4 + [True] * 4])
    noise = jnp.zeros((1, 8, 1))  # U = 0: every second choice is kept
    r = top_k_gating(logits, top_k=2, capacity=2, policy="random", noise=noise, valid=valid)
    placed = np.asarray(r.placed)[0]
    assert not placed[:4].any()
    assert placed[4:6].all() and not placed[6:].any()  # the first two real tokens fill 0 and 1


@pytest.mark.slow  # 13 compilations; the issue's example above stays in make test-fast
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_padding_has_no_effect_on_anything_routing_computes(case):
    """Left padding (as evaluation batches have) around a group of real tokens: positions,
    weights, losses and every statistic equal those of the real tokens routed alone, under every
    policy and option; and both equal the slow reference with the padding mask."""
    s, e, k, cf, multiple, policy, gate_norm, skew = case
    pad = 5
    keys = jax.random.split(jax.random.key(zlib.crc32(repr(case).encode())), 3)
    logits = jax.random.normal(keys[0], (2, s, e)).at[..., 0].add(skew)
    noise = second_expert_noise(keys[1], policy, (2, s, e), k)
    capacity = expert_capacity(s, e, k, cf, multiple)
    alone = _jit_gating(logits, top_k=k, capacity=capacity, policy=policy, gate_norm=gate_norm,
                        noise=noise, valid=None)

    def left_pad(x):
        filler = jax.random.normal(keys[2], (2, pad, *x.shape[2:])) * 10  # loud padding
        return jnp.concatenate([filler, x], axis=1)

    valid = jnp.concatenate([jnp.zeros((2, pad), bool), jnp.ones((2, s), bool)], axis=1)
    padded = _jit_gating(left_pad(logits), top_k=k, capacity=capacity, policy=policy,
                         gate_norm=gate_norm, noise=None if noise is None else left_pad(noise),
                         valid=valid)
    assert not np.asarray(padded.placed)[:, :pad].any()
    for name in ("position", "weight", "expert_index"):
        np.testing.assert_allclose(np.asarray(getattr(padded, name))[:, pad:],
                                   np.asarray(getattr(alone, name)), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(padded.aux_loss), float(alone.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(float(padded.z_loss), float(alone.z_loss), rtol=1e-5)
    for name, value in alone.stats.items():
        np.testing.assert_allclose(np.asarray(padded.stats[name]), np.asarray(value), rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    x = jax.random.normal(keys[2], (2, s + pad, 4))
    _, slots, ref = reference_moe(x, left_pad(logits), np.ones((e, 4, 2)), np.ones((e, 2, 4)),
                                  top_k=k, capacity=capacity, policy=policy, gate_norm=gate_norm,
                                  noise=None if noise is None else left_pad(noise),
                                  valid=np.asarray(valid))
    np.testing.assert_array_equal(np.where(padded.placed, padded.position, -1), slots)
    np.testing.assert_allclose(float(padded.aux_loss), ref["aux_loss"], rtol=1e-5)
