"""Learning-rate schedules and the Adafactor settings GLaM trained with."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glam.config import OptimizerConfig, ScheduleConfig
from glam.resolve import load
from glam.optim import capped_decay, lr_schedule, make_optimizer


def test_glam_schedule_constant_then_inverse_sqrt():
    lr = lr_schedule(ScheduleConfig(name="glam", learning_rate=0.01, warmup_steps=0,
                                    constant_steps=10_000), 100_000)
    # lr(count) is the rate of update count + 1.
    assert float(lr(0)) == pytest.approx(0.01)
    assert float(lr(9_999)) == pytest.approx(0.01)
    assert float(lr(39_999)) == pytest.approx(0.01 * 0.5)  # sqrt(10k / 40k)
    assert float(lr(89_999)) == pytest.approx(0.01 / 3)


def test_cosine_schedule():
    lr = lr_schedule(ScheduleConfig(name="cosine", learning_rate=1.0, warmup_steps=10,
                                    end_lr_fraction=0.1), 110)
    assert float(lr(0)) == pytest.approx(0.1)  # the first update is not wasted at rate 0
    assert float(lr(4)) == pytest.approx(0.5) and float(lr(9)) == pytest.approx(1.0)
    assert float(lr(59)) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert float(lr(109)) == pytest.approx(0.1)  # the last update uses the final rate


def test_wsd_schedule():
    lr = lr_schedule(ScheduleConfig(name="wsd", learning_rate=1.0, warmup_steps=10,
                                    decay_fraction=0.2, end_lr_fraction=0.0), 100)
    assert float(lr(4)) == pytest.approx(0.5)
    assert float(lr(9)) == float(lr(49)) == float(lr(79)) == pytest.approx(1.0)
    assert float(lr(89)) == pytest.approx(0.5)
    assert float(lr(99)) == pytest.approx(0.0)


def test_adafactor_decay_is_capped():
    beta2 = capped_decay(0.8, 0.99)
    assert float(beta2(0)) == pytest.approx(0.0)  # 1 - 1^-0.8
    assert float(beta2(9)) == pytest.approx(1 - 10**-0.8)
    assert float(beta2(10**6)) == pytest.approx(0.99)


def test_adafactor_settings_applied():
    cfg = load(["+experiment=glam_recipe"])
    assert cfg.optimizer.name == "adafactor" and cfg.schedule.name == "glam"
    lr = lr_schedule(cfg.schedule, 100)
    tx = make_optimizer(cfg.optimizer, lr)
    params = {"w": jnp.ones((256, 512)), "b": jnp.ones((8,))}
    state = tx.init(params)
    # Factored second moments: a row and a column vector for the matrix, full for the vector;
    # no first moment (beta1 = 0), so nothing of the matrix's full shape is stored.
    shapes = sorted({tuple(x.shape) for x in jax.tree.leaves(state)})
    assert (256,) in shapes and (512,) in shapes and (256, 512) not in shapes

    # A gradient 1000x larger than the last: the second moment lags, the raw update's RMS is
    # above 1, and update clipping caps it at lr x param RMS x 1.0.
    def second_update(tx):
        state = tx.init(params)
        small = {"w": jnp.full((256, 512), 1e-3), "b": jnp.ones((8,))}
        _, state = tx.update(small, state, params)
        updates, _ = tx.update({"w": jnp.ones((256, 512)), "b": jnp.ones((8,))}, state, params)
        return float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))

    clipped = second_update(tx)
    unclipped = second_update(make_optimizer(
        dataclasses.replace(cfg.optimizer, update_clipping=None), lr))
    assert clipped == pytest.approx(float(lr(1)), rel=1e-4)
    assert unclipped > 1.2 * clipped


def test_adamw_clips_global_norm():
    tx = make_optimizer(OptimizerConfig(name="adamw", grad_clip_norm=1.0),
                        optax.constant_schedule(0.1))
    params = {"w": jnp.ones((4, 4))}
    updates, _ = tx.update({"w": jnp.full((4, 4), 1e9)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("name", ["adamw", pytest.param("adafactor", marks=pytest.mark.slow)])
def test_an_update_that_makes_the_weights_non_finite_is_skipped(name):
    """An infinite learning rate: the loss and gradients of step 0 are finite, but the update
    is not. The step is skipped and the state (weights, moments, step count) stays as it was."""
    from flax import nnx

    from glam.mesh import RULES, make_mesh
    from glam.config import MeshConfig
    from glam.resolve import model_config
    from glam.step import all_finite, init_state, make_train_step

    cfg = model_config(vocab_size=32, seq_len=8, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                       n_experts=4)
    def schedule(count):
        return jnp.where(count == 0, jnp.inf, 1e-3)

    tx = make_optimizer(OptimizerConfig(name=name), schedule)
    graphdef, _, state, sharding = init_state(cfg, tx, 0, make_mesh(MeshConfig(data=1)), RULES)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    step = make_train_step(graphdef, cfg, schedule, sharding)
    tokens = np.random.default_rng(0).integers(0, 32, (4, 9)).astype(np.int32)
    state, metrics = step(state, tokens, jax.random.key(0), np.float32(1.0))
    assert int(metrics["skipped"]) == 1 and np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert bool(all_finite(state))
