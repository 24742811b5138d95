"""Device meshes, and the one table that maps logical axes to mesh axes.

Mesh axes: `data` (batch), `expert` (experts, and batch too: GShard's layout, where each
expert-parallel device also holds its own slice of the batch), `model` (heads and FFN width).
Parameters, optimizer state and activations name their dimensions with logical axes (batch,
embed, heads, kv, mlp, expert, vocab, ...); `RULES` turns those into mesh axes, so changing the
parallelism never touches the model code.

Expert parallelism: the MoE layer constrains its expert buffer [G, E, C, M] to
(data, expert, -, -) while tokens [G, S, M] live on ((data, expert), -, -); between the two
layouts XLA inserts an all_to_all over `expert`, and the inverse one after the experts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from glam.config import ConfigError, MeshConfig, ModelConfig

AXES = ("data", "expert", "model")

RULES: dict[str, object] = {
    "batch": ("data", "expert"),
    "group": ("data", "expert"),  # MoE groups of tokens, laid out like the batch
    "expert_group": "data",  # the groups' dimension of an expert buffer [G, E, C, M]
    "expert": "expert",
    "heads": "model",
    "mlp": "model",
    "embed": None,
    "kv": None,
    "vocab": None,  # replicated: the world's vocabulary need not divide the model axis
    "buckets": None,
}
FSDP_RULES = {**RULES, "embed": "data"}

# Logical axes of each parameter, by (name, number of dimensions).
PARAM_AXES: dict[tuple[str, int], tuple] = {
    ("embed", 2): ("vocab", "embed"),
    ("unembed", 2): ("embed", "vocab"),
    ("wq", 3): ("embed", "heads", "kv"),
    ("wk", 3): ("embed", "heads", "kv"),
    ("wv", 3): ("embed", "heads", "kv"),
    ("wo", 3): ("heads", "kv", "embed"),
    ("rel_bias", 2): ("buckets", "heads"),
    ("wi", 2): ("embed", "mlp"),
    ("wi_gate", 2): ("embed", "mlp"),
    ("wo", 2): ("mlp", "embed"),
    ("router", 2): ("embed", None),
    ("w_in", 3): ("expert", "embed", "mlp"),
    ("w_out", 3): ("expert", "mlp", "embed"),
    ("scale", 1): ("embed",),
}

_active: Optional[tuple[Mesh, dict]] = None


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes with -1 filled from the device count; refused unless they multiply to it."""
    sizes = [cfg.data, cfg.expert, cfg.model]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one axis may be -1 (fill the remaining devices).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices are not divisible by the fixed axes "
                              f"(product {known}); fix mesh.data/expert/model.")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: data x expert x model = {sizes[0]} x {sizes[1]} x {sizes[2]} = "
                          f"{math.prod(sizes)}, but there are {n_devices} devices; make the "
                          "product equal the device count or set one axis to -1.")
    return tuple(sizes)


def check_divisibility(shape: tuple[int, int, int], model: ModelConfig, batch_size: int) -> None:
    """Refuse, before compilation, a model or batch that does not split over the mesh. (A dense
    model on a mesh with an `expert` axis uses it as more data parallelism: the batch is split
    over data x expert.)"""
    data, expert, tensor = shape
    problems = []
    if model.n_experts and model.n_experts % expert:
        problems.append(f"model.n_experts={model.n_experts} is not divisible by mesh.expert={expert}")
    if batch_size % (data * expert):
        problems.append(f"train.batch_size={batch_size} is not divisible by mesh.data x mesh.expert"
                        f" = {data * expert}")
    for name, size in (("n_heads", model.n_heads), ("d_ff", model.d_ff),
                       ("expert_d_ff", model.expert_hidden)):
        if size % tensor:
            problems.append(f"model.{name}={size} is not divisible by mesh.model={tensor}")
    if problems:
        raise ConfigError("mesh: " + "; ".join(problems) + ".")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """The mesh over `devices` (default: every device of every process). `jax.make_mesh` orders
    them by the physical topology (TPU ICI rings); on GPU and CPU in process order with the last
    axis, `model`, varying fastest: `model` (then `expert`) stays within a host as long as its
    size (times `model`'s) fits the host's devices."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes: tuple, rules: dict) -> PartitionSpec:
    return PartitionSpec(*(None if a is None else rules[a] for a in axes))


def state_shardings(state, mesh: Mesh, rules: dict):
    """NamedSharding of every array of an nnx state (model and optimizer): a parameter by its
    name; an optimizer-state array like the parameter whose name and shape it shares (Adam's
    moments); anything else (counters, Adafactor's factored moments) replicated."""

    def sharding(path, leaf):
        names = [p.key for p in path if isinstance(getattr(p, "key", None), str)]
        axes = PARAM_AXES.get((names[-1], leaf.ndim)) if names else None
        spec = logical_spec(axes, rules) if axes else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(sharding, state)


def data_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(("batch", None), rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: dict) -> Iterator[None]:
    """Within this context (around tracing), `constrain` annotates activations for `mesh`."""
    global _active
    previous, _active = _active, (mesh, rules)
    try:
        yield
    finally:
        _active = previous


def constrain(x: jax.Array, *axes) -> jax.Array:
    """Pin `x`'s layout to the logical `axes` on the active mesh; no-op without one."""
    if _active is None:
        return x
    mesh, rules = _active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes, rules)))
