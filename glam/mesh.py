"""Device meshes, and the one table that maps logical axes to mesh axes.

Mesh axes: `data` (batch), `expert` (experts, and batch too: GShard's layout, where each
expert-parallel device also holds its own slice of the batch), `model` (heads and FFN width).
Every parameter declares the logical axes of its dimensions where it is created
(`glam.model.layers.declare`: batch, embed, heads, kv, mlp, expert, vocab, ...); activations
name theirs in `constrain`. `RULES` turns logical axes into mesh axes, so changing the
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
from flax import nnx
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


def rules_for(cfg: MeshConfig) -> dict:
    """The logical-axis table of `cfg`: `RULES`, with `embed` over `data` under `fsdp`."""
    return FSDP_RULES if cfg.fsdp else RULES


_active: Optional[tuple[Mesh, dict]] = None


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, expert, model) axis sizes with -1 filled from the device count.

    Raises:
      ConfigError: more than one -1, or sizes whose product is not `n_devices`.
    """
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
    over data x expert.)

    Raises:
      ConfigError: naming every field that does not divide (n_experts, batch_size, n_heads,
        d_ff, expert_d_ff) and the mesh axis it must divide by.
    """
    data, expert, tensor = shape
    problems = []
    if model.n_experts and model.routed_experts % expert:
        what = "n_experts" if model.granularity == 1 else "n_experts x granularity"
        problems.append(f"model.{what}={model.routed_experts} is not divisible by "
                        f"mesh.expert={expert}")
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
    size (times `model`'s) fits the host's devices.

    Raises:
      ConfigError: the axis sizes do not fit the device count (`mesh_shape`).
    """
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes: tuple, rules: dict) -> PartitionSpec:
    """The PartitionSpec of logical `axes` (one per dimension, None: never split) under `rules`.

    Raises:
      KeyError: an axis name missing from `rules`.
    """
    return PartitionSpec(*(None if a is None else rules[a] for a in axes))


def _declared_axes(variable: nnx.Variable) -> tuple | None:
    return variable.get_metadata().get("out_sharding")


def state_shardings(state, mesh: Mesh, rules: dict):
    """NamedSharding of every array of an nnx state (model and optimizer), from the logical
    axes each parameter declared at creation (`glam.model.layers.declare`). An optimizer-state
    array takes the axes it inherited from its parameter when it has that parameter's shape
    (Adam's moments); others (counters, Adafactor's factored moments) are replicated.

    Raises:
      ValueError: a parameter of rank >= 2 declares no logical axes (it would be replicated
        silently), or an axis name is not in `rules`.
    """
    params = {(axes, v.shape) for v in jax.tree.leaves(state, is_leaf=_is_variable)
              if isinstance(v, nnx.Param) and (axes := _declared_axes(v)) is not None}

    def sharding(path, variable):
        axes, shape = _declared_axes(variable), variable.shape
        if isinstance(variable, nnx.Param):
            if axes is None and len(shape) >= 2:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} of shape {shape} "
                                 "declares no logical axes; create it with "
                                 "glam.model.layers.declare/param.")
        elif (axes, shape) not in params:
            axes = None
        unknown = [a for a in axes or () if a is not None and a not in rules]
        if unknown:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)}: logical axes {unknown} "
                             "are not in glam.mesh.RULES.")
        spec = logical_spec(axes, rules) if axes else PartitionSpec()
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(sharding, state, is_leaf=_is_variable)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def data_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
    """Sharding of a token batch [B, T+1] int32: rows over `batch` (data x expert)."""
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
