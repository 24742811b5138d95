"""Meshes: refusal of impossible ones, and equality with one device on 8 fake CPU devices."""

import json
import os
import sys
from pathlib import Path

import pytest

import waiting
from glam.config import ConfigError, MeshConfig
from glam.resolve import CONF_DIR, model_config
from glam.mesh import check_divisibility, mesh_shape


def test_mesh_shape_fills_and_refuses():
    assert mesh_shape(MeshConfig(data=-1, expert=4, model=1), 8) == (2, 4, 1)
    assert mesh_shape(MeshConfig(data=1, expert=1, model=1), 1) == (1, 1, 1)
    with pytest.raises(ConfigError, match=r"2 x 2 x 1 = 4, but there are 8 devices"):
        mesh_shape(MeshConfig(data=2, expert=2, model=1), 8)
    with pytest.raises(ConfigError, match="not divisible by the fixed axes"):
        mesh_shape(MeshConfig(data=-1, expert=3, model=1), 8)


@pytest.mark.parametrize("shape,batch,message", [
    ((1, 4, 1), 8, r"model.n_experts=6 is not divisible by mesh.expert=4"),
    ((2, 2, 1), 6, r"train.batch_size=6 is not divisible by mesh.data x mesh.expert = 4"),
    ((1, 1, 4), 8, r"model.n_heads=2 is not divisible by mesh.model=4"),
])
def test_impossible_meshes_are_refused(shape, batch, message):
    cfg = model_config(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, n_experts=6)
    with pytest.raises(ConfigError, match=message):
        check_divisibility(shape, cfg, batch)


@pytest.mark.slow
def test_meshes_match_one_device():
    """Forward logits, one-step gradients and a 20-step loss trajectory on meshes (8,1,1),
    (2,4,1), (1,8,1), (2,2,2) of 8 fake devices equal the single-device run."""
    script = Path(__file__).with_name("mesh_check.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = waiting.run([sys.executable, str(script)], 600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"(8, 1, 1)", "(2, 4, 1)", "(1, 8, 1)", "(2, 2, 2)"}
    for shape, diff in report.items():
        assert diff["logits"] < 1e-4 and diff["grads_rel"] < 1e-4, shape
        assert diff["losses"] < 1e-4, shape
        assert diff["w_in_spec"] == "P('expert', None, 'model')"  # experts sharded over `expert`


@pytest.mark.parametrize("preset,devices,model", [
    ("cpu", 1, "cpu_moe"), ("cpu8", 8, "cpu_moe"), ("gpu8", 8, "paper/glam_1_7b_64e"),
    ("tpu_v4_32", 16, "paper/glam_8b_64e"), ("tpu_v5p_64", 32, "paper/glam_64b_64e"),
])
def test_mesh_presets_compose_and_fit_their_models(preset, devices, model):
    from glam.resolve import load

    cfg = load([f"mesh={preset}", f"model={model}", "train.batch_size=256",
                "data.val_tokens=300000"])
    shape = mesh_shape(cfg.mesh, devices)
    check_divisibility(shape, cfg.model, cfg.train.batch_size)  # refuses with the numbers
    assert shape[0] * shape[1] * shape[2] == devices


@pytest.mark.slow  # composes every point of every study
@pytest.mark.parametrize("study", ["smoke", "compute_vs_accuracy", "expert_count",
                                   "study_expert_count"])
def test_cpu_studies_fit_mesh_cpu8(study):
    """Every point of the CPU studies runs unchanged with mesh=cpu8 (refused before launch
    otherwise)."""
    from glam.resolve import load
    from glam.study.points import expand

    points = expand([f"+study={study}", "mesh=cpu8"])
    assert len(points) > 1
    for point in points:
        cfg = load(point)
        check_divisibility(mesh_shape(cfg.mesh, 8), cfg.model, cfg.train.batch_size)


PRESETS = sorted(str(p.relative_to(p.parents[1] if p.parent.name == "paper" else p.parent)
                     .with_suffix("")) for p in (CONF_DIR / "model").rglob("*.yaml"))


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow)
                                    if p.startswith("paper/") else p for p in PRESETS])
def test_every_parameter_of_every_preset_is_sharded_by_its_declared_axes(preset):
    """Built abstractly (nnx.eval_shape: no memory), every parameter declares one logical axis
    per dimension, and the shardings follow them (embed over data under fsdp, experts over
    expert)."""
    import jax
    import optax
    from flax import nnx

    from glam.mesh import FSDP_RULES, make_mesh, state_shardings
    from glam.model import GLaM
    from glam.resolve import load

    cfg = load([f"model={preset}"], backend="cpu")
    model = nnx.eval_shape(lambda: GLaM(cfg.model, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Param))
    assert params and all(len(p.get_metadata()["out_sharding"]) == p.ndim for p in params)
    opt = nnx.eval_shape(lambda: nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param))
    state = nnx.state((model, opt))
    shardings = state_shardings(state, make_mesh(MeshConfig(data=1)), FSDP_RULES)
    specs = {jax.tree_util.keystr(p): s.get_value().spec for p, s in jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    embed = next(v for k, v in specs.items() if k.endswith("[0]['embed']"))
    assert embed == jax.sharding.PartitionSpec(None, "data")
    for key, spec in specs.items():
        if key.endswith("['w_in']"):
            assert spec[0] == "expert", key  # the parameter and Adam's moments alike


def test_a_parameter_without_declared_axes_is_refused():
    import jax.numpy as jnp
    from flax import nnx

    from glam.mesh import RULES, make_mesh, state_shardings

    class Undeclared(nnx.Module):
        def __init__(self):
            self.renamed = nnx.Param(jnp.ones((4, 4)))

    with pytest.raises(ValueError, match=r"renamed.*declares no logical axes"):
        state_shardings(nnx.state(Undeclared()), make_mesh(MeshConfig(data=1)), RULES)
