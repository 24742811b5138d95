"""Run by tests/test_mesh.py in a fresh process with 8 fake CPU devices: the same tiny MoE model
on several meshes against one device. Prints one JSON object of the largest differences."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from glam.config import MeshConfig  # noqa: E402
from glam.mesh import RULES, activate, data_sharding, make_mesh  # noqa: E402
from glam.resolve import model_config  # noqa: E402
from glam.step import init_state, loss_fn, make_train_step  # noqa: E402

CFG = model_config(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                   n_experts=8, top_k=2, router={"capacity_factor": 1.25})
BATCHES = np.random.default_rng(0).integers(0, 64, (20, 8, CFG.seq_len + 1)).astype(np.int32)


def run(shape: tuple[int, int, int]):
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = make_mesh(MeshConfig(*shape), devices)
    schedule = optax.constant_schedule(3e-3)
    graphdef, _, state, sharding = init_state(CFG, optax.adamw(schedule), 0, mesh, RULES)

    def logits_and_grads(state, tokens):
        model, _ = nnx.merge(graphdef, state, copy=True)
        (_, (lm, _, _)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, None, CFG)
        logits, _ = model(tokens[:, :-1])
        return logits, nnx.to_pure_dict(grads)

    with activate(mesh, RULES):
        logits, grads = jax.jit(logits_and_grads)(state, BATCHES[0])
        step = make_train_step(graphdef, CFG, schedule, sharding, data_sharding(mesh, RULES))
        losses = []
        for i, batch in enumerate(BATCHES):
            state, metrics = step(state, batch, jax.random.key(i), np.float32(1.0))
            losses.append(float(metrics["lm_loss"]))
    w_in = [l for p, l in jax.tree.leaves_with_path(state) if "w_in" in jax.tree_util.keystr(p)][0]
    return np.asarray(logits), jax.device_get(grads), np.asarray(losses), str(w_in.sharding.spec)


base_logits, base_grads, base_losses, _ = run((1, 1, 1))
report = {}
for shape in [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]:
    logits, grads, losses, spec = run(shape)
    grad_diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)))
    report[str(shape)] = {"logits": float(np.max(np.abs(logits - base_logits))),
                          "grads_rel": grad_diff,
                          "losses": float(np.max(np.abs(losses - base_losses))),
                          "w_in_spec": spec}
json.dump(report, sys.stdout)
