"""The measurements of `glam-bench` (listed in `glam.cli.bench`): matmul peak, MoE FFN vs
dense FFN, whole training steps with MFU and memory, the expert-parallel step, and data
preparation and loading (`glam.data.bench`). Times are medians of repeated runs after a warm-up
call; ratios come from the same run."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glam import accounting
from glam.config import ConfigError
from glam.hardware import cpu_model
from glam.data.bench import data_bench
from glam.data.bench import render as render_data
from glam.model.layers import project
from glam.model.moe import DISPATCH, ExpertWeights, experts_ffn
from glam.model.routing import expert_capacity, top_k_gating
from glam.resolve import load


def median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak(dtype, n: int) -> float:
    a = jnp.ones((n, n), dtype)
    seconds = median_seconds(jax.jit(jnp.dot), a, a)
    return 2 * n**3 / seconds


def copy_bandwidth(mib: int = 256) -> float:
    """Bytes/s of a large elementwise op (read one array, write a fresh one) as XLA runs it:
    the rate at which a step can stream parameters and gradients that do not fit in cache."""
    a = jnp.ones((mib * 2**18,), jnp.float32)
    return 2 * a.nbytes / median_seconds(jax.jit(lambda a: a * 2.0), a)


def moe_vs_dense(tokens: int, m: int, h: int, group: int, experts: list[int], k: int = 2,
                 dispatches=("gather", "einsum", "dropless"), dtype=jnp.float32) -> list[dict]:
    """Forward+backward of one MoE FFN per (E, dispatch) against the dense FFN of equal
    activated FLOPs (width K x H), with its parts timed alone: routing (router matmul and
    `top_k_gating`, with their gradients) and the experts' batched matmuls on a full
    [G, E, C, M] buffer (no dispatch). Also the expert parameters' size: they and their
    gradients stream through memory once per step whatever the token count."""
    key = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(key[0], (tokens // group, group, m), dtype)
    w1 = (jax.random.normal(key[1], (m, k * h)) / np.sqrt(m)).astype(dtype)
    w2 = (jax.random.normal(key[2], (k * h, m)) / np.sqrt(k * h)).astype(dtype)

    def dense(x, w1, w2):  # as the model's dense FFN computes it
        return jnp.sum(project(jax.nn.gelu(project(x, w1)), w2))

    dense_s = median_seconds(jax.jit(jax.grad(dense, argnums=(0, 1, 2))), x, w1, w2)
    rows = []
    for e in experts:
        router = jax.random.normal(key[3], (m, e)) / np.sqrt(m)
        w_in = (jax.random.normal(key[4], (e, m, h)) / np.sqrt(m)).astype(dtype)
        w_out = (jax.random.normal(key[5], (e, h, m)) / np.sqrt(h)).astype(dtype)
        capacity = expert_capacity(group, e, k, 1.25)

        def routing_only(x, router):
            r = top_k_gating(project(x, router), top_k=k, capacity=capacity)
            return jnp.sum(r.weight) + r.aux_loss

        routing_s = median_seconds(jax.jit(jax.grad(routing_only, argnums=(0, 1))), x, router)
        buffer = jnp.ones((tokens // group, e, capacity, m), dtype)
        experts_s = median_seconds(
            jax.jit(jax.grad(lambda b, w_in, w_out: jnp.sum(experts_ffn(b, ExpertWeights(w_in, w_out))),
                             argnums=(0, 1, 2))), buffer, w_in, w_out)
        for dispatch in dispatches:
            cap = group if dispatch == "dropless" else capacity

            def moe(x, router, w_in, w_out, dispatch=dispatch, cap=cap):
                routing = top_k_gating(project(x, router), top_k=k, capacity=cap)
                return jnp.sum(DISPATCH[dispatch](x, routing, ExpertWeights(w_in, w_out)))

            seconds = median_seconds(jax.jit(jax.grad(moe, argnums=(0, 1, 2, 3))),
                                     x, router, w_in, w_out)
            rows.append({"m": m, "h": h, "experts": e, "dispatch": dispatch,
                         "moe_ms": seconds * 1e3, "routing_ms": routing_s * 1e3,
                         "experts_ms": experts_s * 1e3, "dense_ms": dense_s * 1e3,
                         "ratio": seconds / dense_s,
                         "expert_param_mib": 2 * e * m * h * jnp.dtype(dtype).itemsize / 2**20})
    return rows


def train_step_bench(overrides: list[str], steps: int = 10, n_devices: int | None = None) -> dict:
    """Seconds per training step of the model `overrides` select, with its FLOPs and memory,
    on the first `n_devices` devices (default: all)."""
    from glam.mesh import activate, data_sharding, make_mesh, rules_for
    from glam.step import init_state, make_train_step

    cfg = load(overrides)
    rules = rules_for(cfg.mesh)
    m, t = cfg.model, cfg.train
    mesh = make_mesh(cfg.mesh, jax.devices()[:n_devices] if n_devices else None)
    schedule = optax.constant_schedule(1e-3)
    graphdef, _, state, sharding = init_state(m, optax.adamw(schedule), 0, mesh, rules)
    step = make_train_step(graphdef, m, schedule, sharding, data_sharding(mesh, rules))
    batch = np.random.default_rng(0).integers(0, m.vocab_size, (t.batch_size, m.seq_len + 1))
    batch = batch.astype(np.int32)
    with activate(mesh, rules):
        state, metrics = step(state, batch, jax.random.key(0), np.float32(1.0))
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, jax.random.key(i), np.float32(1.0))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    tokens = t.batch_size * m.seq_len
    flops = tokens * accounting.count(m).train_flops_per_token
    return {"model": " ".join(overrides), "seconds": seconds, "tokens_per_s": tokens / seconds,
            "train_flops_per_step": flops, "flops_per_s": flops / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@dataclass(frozen=True)
class Shapes:
    """What the bench measures on a backend: the FFN shapes (tokens in routing groups, M x
    expert H) and the whole-step shape (presets widened until their matmuls fill the device)."""

    matmul_n: int
    ffn_tokens: int
    ffn_group: int
    ffn: tuple[tuple[int, int], ...]
    step_batch: int
    step_seq_len: int
    step_width: tuple[str, ...]

    @property
    def step_shape(self) -> list[str]:
        return [*self.step_width, f"model.seq_len={self.step_seq_len}",
                f"train.batch_size={self.step_batch}"]

    def step_models(self) -> dict[str, list[str]]:
        matched = ["model=cpu_moe", "plan.placement=matched", *self.step_shape]
        return {"dense": ["model=cpu_dense", *self.step_shape],
                "moe_glam": ["model=cpu_moe", *self.step_shape],
                "moe_matched": matched,
                # the design axes at the same activated FLOPs (glam.placement)
                "moe_matched_g4": [*matched, "model.granularity=4"],
                "moe_matched_shared1": [*matched, "model.shared_experts=1"],
                "moe_matched_bias": [*matched, "model.router.balance=bias"]}


CPU = Shapes(2048, 4096, 1024, ((128, 512), (256, 1024)), 8, 128,
             ("model.d_model=512", "model.d_ff=2048", "model.n_heads=8"))
# A GPU or TPU needs ~16x larger matmuls than 2 CPU cores to approach its peak.
ACCELERATOR = Shapes(8192, 65536, 1024, ((1024, 4096), (2048, 8192)), 16, 1024,
                     ("model.d_model=2048", "model.d_ff=8192", "model.n_heads=16"))


def shapes_for(backend: str) -> Shapes:
    return ACCELERATOR if backend in ("gpu", "tpu") else CPU


def expert_parallel() -> dict:
    """Run in a child process with 8 fake devices: MoE step on mesh (1,8,1) vs (1,1,1)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}  # fake CPU devices, also on a GPU host
    code = ("import json; from glam.bench import train_step_bench as b; "
            "o=['model=tiny_moe','model.n_experts=8','train.batch_size=16'];"
            "one=b(o+['mesh.data=1','mesh.expert=1','mesh.model=1'],n_devices=1);"
            "eight=b(o+['mesh.data=1','mesh.expert=8','mesh.model=1'],n_devices=8);"
            "print(json.dumps({'one_device_s': one['seconds'], 'eight_devices_s': eight['seconds']}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        return {"error": out.stderr[-500:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["overhead"] = result["eight_devices_s"] / result["one_device_s"]
    return result


def machine() -> str:
    return (f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores "
            f"{cpu_model()}; jax {jax.__version__}")


def render(results: dict, command: str) -> str:
    f32, bf16 = results["peak_f32"], results["peak_bf16"]
    dtype = results["dtype"]
    peak = f32 if dtype == "float32" else bf16
    lines = [f"## {results['date']} — {results['machine']}", "", f"Command: `{command}`", "",
             f"Matmul peak ({results.get('matmul_n', 2048)}^3): float32 {f32 / 1e9:.1f} GFLOP/s, bfloat16 "
             f"{bf16 / 1e9:.1f} GFLOP/s.", "",
             f"Large elementwise op (256 MiB in, a fresh 256 MiB out): "
             f"{results['bandwidth'] / 1e9:.1f} GB/s.", "",
             "MoE FFN forward+backward vs a dense FFN of equal activated FLOPs "
             f"({results['ffn_shape']}, {dtype}), capacity factor 1.25 (floor 1.25x: the "
             "experts compute 1.25x the FLOPs; dropless has no padding). Routing: router matmul "
             "and gating alone; experts: the batched expert matmuls alone on a full buffer; "
             "params: expert weights (their gradients are as large):", "",
             "| M x H | E | dispatch | MoE ms | routing ms | experts ms | dense ms | "
             "MoE / dense | experts / dense | params MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["ffn"]:
        lines.append(f"| {r['m']} x {r['h']} | {r['experts']} | {r['dispatch']} | "
                     f"{r['moe_ms']:.1f} | {r['routing_ms']:.1f} | {r['experts_ms']:.1f} | "
                     f"{r['dense_ms']:.1f} | {r['ratio']:.2f} | "
                     f"{r['experts_ms'] / r['dense_ms']:.2f} | {r['expert_param_mib']:.0f} |")
    dense = results["steps"]["dense"]
    lines += ["", f"Whole training step ({results['step_shape']}, {dtype}):", "",
              f"| model | s/step | tokens/s | MFU ({dtype} peak) | vs dense | peak RSS GiB |",
              "|---|---|---|---|---|---|"]
    for name, r in results["steps"].items():
        model = r["model"].replace(f" {results['step_shape']}", "").replace(
            f" model.dtype={dtype}", "")
        lines.append(f"| {name} ({model}) | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['flops_per_s'] / peak:.0%} | {r['seconds'] / dense['seconds']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} |")
    ep = results["expert_parallel"]
    if "error" in ep:
        lines += ["", f"Expert-parallel step: failed ({ep['error']})"]
    else:
        lines += ["", f"Expert-parallel MoE step (tiny_moe, E=8) on 8 fake CPU devices, mesh "
                      f"(1,8,1): {ep['eight_devices_s']:.3f} s vs {ep['one_device_s']:.3f} s on "
                      f"one device ({ep['overhead']:.2f}x: all_to_all and partitioning overhead "
                      "on 2 real cores, not a speed-up)."]
    if "data" in results:
        lines += render_data(results["data"])
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    """Runs `glam-bench` with its parsed arguments (`glam.cli.bench`): checks every shape it
    will use before any JAX work (`error` reports a bad argument and exits), measures, writes
    `args.json` and prepends the report to `args.out`."""
    try:  # every shape the bench will use, before any JAX work
        experts = [int(e) for e in args.experts.split(",")]
    except ValueError:
        error(f"--experts: {args.experts!r} is not a comma-separated list of integers")
    if any(e < 2 for e in experts):
        error(f"--experts: every count must be at least 2 (top-2 routing), got {experts}")
    shapes = shapes_for(jax.default_backend())
    for overrides in shapes.step_models().values():
        try:
            load(overrides, backend="cpu")
        except ConfigError as err:
            error(f"step model {' '.join(overrides)}: {err}")
    dtype = args.dtype or ("bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32")
    n = shapes.matmul_n
    results = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "matmul_n": n, "peak_f32": matmul_peak(jnp.float32, n),
               "peak_bf16": matmul_peak(jnp.bfloat16, n), "bandwidth": copy_bandwidth(),
               "ffn_shape": f"{shapes.ffn_tokens} tokens in groups of {shapes.ffn_group}, top-2",
               "step_shape": " ".join(shapes.step_shape), "dtype": dtype}
    results["ffn"] = [row for m, h in shapes.ffn
                      for row in moe_vs_dense(shapes.ffn_tokens, m, h, shapes.ffn_group, experts,
                                              dtype=jnp.dtype(dtype))]
    results["steps"] = {name: train_step_bench(o + [f"model.dtype={dtype}"], n_devices=1)
                        for name, o in shapes.step_models().items()}  # MFU of one peak
    results["expert_parallel"] = expert_parallel()
    results["data"] = data_bench(results["steps"]["dense"]["seconds"], shapes.step_batch,
                                 shapes.step_seq_len)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    text = render(results, "make bench")
    out = Path(args.out)
    header = "# Benchmarks\n\nWritten by `glam-bench` (`make bench`); newest first.\n\n"
    previous = out.read_text().split("\n", 4)[-1] if out.exists() else ""
    out.write_text(header + text + ("\n" + previous if previous.startswith("## ") else ""))
    print(text)
