"""The decoder: shapes, causality, dtypes, layer placement, relative position buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glam.resolve import model_config
from glam.model import GLaM
from glam.model.layers import relative_position_buckets
from glam.model.moe import MoEFeedForward

TINY = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64)


@pytest.mark.slow
@pytest.mark.parametrize("n_experts", [0, 4])
def test_causality(n_experts):
    """Changing token t changes no logit before t. Capacity is ample: GShard's capacity
    dropping lets later tokens of a group change earlier tokens' routing (see routing docs)."""
    cfg = model_config(**TINY, n_experts=n_experts, router={"capacity_factor": 2.0})
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
    a, _ = model(tokens)
    b, _ = model(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_moe_layer_placement():
    cfg = model_config(**{**TINY, "n_layers": 6}, n_experts=4, moe_every=2, moe_offset=0)
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    kinds = [isinstance(b.ffn, MoEFeedForward) for b in model.blocks]
    assert kinds == [True, False, True, False, True, False]
    assert cfg.moe_layers == (0, 2, 4)
    shifted = model_config(**{**TINY, "n_layers": 6}, n_experts=4, moe_every=3, moe_offset=1)
    assert shifted.moe_layers == (1, 4)
    assert model_config(**TINY, n_experts=0).moe_layers == ()


def test_outputs_and_router_losses():
    cfg = model_config(**TINY, n_experts=4)
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 16), jnp.int32)
    logits, moe = model(tokens, jax.random.key(0))
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    assert set(moe.layer_stats) == {0}
    assert np.isfinite(float(moe.aux_loss)) and float(moe.aux_loss) > 0
    assert float(moe.aux_loss) == pytest.approx(float(moe.layer_stats[0]["aux_loss"]))
    dense_logits, dense_moe = GLaM(model_config(**TINY), rngs=nnx.Rngs(0))(tokens)
    assert float(dense_moe.aux_loss) == 0.0 and dense_moe.layer_stats == {}


def test_bfloat16_activations_keep_float32_params_and_router():
    cfg = model_config(**TINY, n_experts=4, dtype="bfloat16")
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    logits, moe = model(jnp.ones((2, 16), jnp.int32))
    assert logits.dtype == jnp.float32 and moe.aux_loss.dtype == jnp.float32
    f32, _ = GLaM(model_config(**TINY, n_experts=4), rngs=nnx.Rngs(0))(jnp.ones((2, 16), jnp.int32))
    np.testing.assert_allclose(logits, f32, atol=0.15)


def test_untied_and_wide_attention():
    cfg = model_config(**TINY, tie_embeddings=False, d_head=24, attn_width=48, ffn_kind="gelu")
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    assert model.blocks[0].attn.wq.shape == (32, 2, 24)
    assert model.unembed.shape == (32, 64)
    logits, _ = model(jnp.ones((1, 16), jnp.int32))
    assert logits.shape == (1, 16, 64)


@pytest.mark.slow
def test_group_size_must_divide_tokens():
    cfg = model_config(**TINY, n_experts=4, router={"group_size": 12})
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group_size=12 does not divide the 32 tokens"):
        model(jnp.ones((2, 16), jnp.int32))
    ok = GLaM(model_config(**TINY, n_experts=4, router={"group_size": 8}), rngs=nnx.Rngs(0))
    assert ok(jnp.ones((2, 16), jnp.int32))[0].shape == (2, 16, 64)


def test_relative_position_buckets_t5():
    b = relative_position_buckets(300, 32, 128)
    assert b.shape == (300, 300)
    assert b[5, 5] == 0 and b[20, 5] == 15  # exact below num_buckets / 2
    assert b[10, 12] == 0  # future keys (masked anyway) share bucket 0
    assert b[299, 0] == 31 and b[200, 0] == 31  # beyond max_distance: the last bucket
    row = b[299, ::-1]
    assert np.all(np.diff(row) >= 0)  # monotone in distance
    # log-spaced: bucket 16 + floor(16 * log(d / 16) / log(128 / 16))
    assert b[16, 0] == 16 and b[32, 0] == 21 and b[127, 0] == 31


def test_jitter_and_policy_noise_only_with_a_key():
    base = dict(**TINY, n_experts=4, router={"jitter": 0.5, "second_expert_policy": "random"})
    model = GLaM(model_config(**base), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    a, _ = model(tokens)
    b, _ = model(tokens)
    np.testing.assert_array_equal(a, b)  # evaluation: deterministic routing
    c, _ = model(tokens, jax.random.key(0))
    d, _ = model(tokens, jax.random.key(1))
    assert not np.allclose(c, d)
