"""Learning-rate schedules and the Adafactor settings GLaM trained with."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glam.config import OptimizerConfig, ScheduleConfig
from glam.count import load
from glam.optim import capped_decay, lr_schedule, make_optimizer


def test_glam_schedule_constant_then_inverse_sqrt():
    lr = lr_schedule(ScheduleConfig(name="glam", learning_rate=0.01, warmup_steps=0,
                                    constant_steps=10_000), 100_000)
    assert float(lr(0)) == pytest.approx(0.01)
    assert float(lr(9_999)) == pytest.approx(0.01)
    assert float(lr(40_000)) == pytest.approx(0.01 * 0.5)  # sqrt(10k / 40k)
    assert float(lr(90_000)) == pytest.approx(0.01 / 3)


def test_cosine_schedule():
    lr = lr_schedule(ScheduleConfig(name="cosine", learning_rate=1.0, warmup_steps=10,
                                    end_lr_fraction=0.1), 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert float(lr(110)) == pytest.approx(0.1)


def test_wsd_schedule():
    lr = lr_schedule(ScheduleConfig(name="wsd", learning_rate=1.0, warmup_steps=10,
                                    decay_fraction=0.2, end_lr_fraction=0.0), 100)
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == float(lr(50)) == float(lr(80)) == pytest.approx(1.0)
    assert float(lr(90)) == pytest.approx(0.5)
    assert float(lr(100)) == pytest.approx(0.0)


def test_adafactor_decay_is_capped():
    beta2 = capped_decay(0.8, 0.99)
    assert float(beta2(0)) == pytest.approx(0.0)  # 1 - 1^-0.8
    assert float(beta2(9)) == pytest.approx(1 - 10**-0.8)
    assert float(beta2(10**6)) == pytest.approx(0.99)


def test_adafactor_settings_applied():
    cfg = load(["+experiment=glam_recipe"])
    assert cfg.optimizer.name == "adafactor" and cfg.schedule.name == "glam"
    tx = make_optimizer(cfg.optimizer, lr_schedule(cfg.schedule, 100))
    params = {"w": jnp.ones((256, 512)), "b": jnp.ones((8,))}
    state = tx.init(params)
    # Factored second moments: a row and a column vector for the matrix, full for the vector.
    shapes = sorted({tuple(x.shape) for x in jax.tree.leaves(state)})
    assert (256,) in shapes and (512,) in shapes and (256, 512) not in shapes
    # No first moment: nothing of the matrix's full shape is stored (beta1 = 0).
    # Update clipping: a huge gradient moves each weight by at most lr x param RMS x 1.0.
    grads = {"w": jnp.full((256, 512), 1e6).at[0, 0].set(-1e6), "b": jnp.ones((8,))}
    updates, _ = tx.update(grads, state, params)
    rms = float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))
    assert rms <= 0.01 * 1.0 + 1e-6


def test_adamw_clips_global_norm():
    tx = make_optimizer(OptimizerConfig(name="adamw", grad_clip_norm=1.0),
                        optax.constant_schedule(0.1))
    params = {"w": jnp.ones((4, 4))}
    updates, _ = tx.update({"w": jnp.full((4, 4), 1e9)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))
