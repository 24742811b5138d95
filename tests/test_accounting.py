"""Analytic counts against the instantiated model, the traced matmuls, and GLaM Table 2."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glam import accounting
from glam.cli.count import main as count_main
from glam.model import GLaM, param_count
from glam.resolve import CONF_DIR, load, model_config

PRESETS = sorted(str(p.relative_to(CONF_DIR / "model").with_suffix(""))
                 for p in (CONF_DIR / "model").rglob("*.yaml"))
PAPER = [p for p in PRESETS if p.startswith("paper/")]


def test_every_paper_row_has_a_preset():
    names = {Path(p).name for p in PAPER}
    assert names == {"dense_0_1b", "glam_0_1b_64e", "dense_1_7b", "glam_1_7b_32e",
                     "glam_1_7b_64e", "glam_1_7b_128e", "glam_1_7b_256e", "dense_8b",
                     "glam_8b_64e", "dense_137b", "glam_64b_64e", "gpt3_175b"}


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow)
                                    if p.startswith("paper/") else p for p in PRESETS])
def test_analytic_params_equal_instantiated_model(preset):
    cfg = load([f"model={preset}"]).model
    abstract = nnx.eval_shape(lambda: GLaM(cfg, rngs=nnx.Rngs(0)))
    assert accounting.count(cfg).total_params == param_count(abstract)


@pytest.mark.parametrize("overrides", [
    dict(tie_embeddings=False, ffn_kind="gelu"),
    dict(n_experts=3, top_k=1, expert_d_ff=40, moe_every=3, moe_offset=2, n_layers=5),
    dict(d_head=24, attn_width=72, n_heads=3, rel_pos_buckets=8, rel_pos_max_distance=20),
    dict(granularity=4, shared_experts=2, expert_kind="geglu", router={"balance": "bias"}),
    dict(granularity=2, shared_experts=1, top_k=1),
])
def test_analytic_params_equal_model_variants(overrides):
    cfg = model_config(**{**dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                 n_experts=4), **overrides})
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    assert accounting.count(cfg).total_params == param_count(model)


def _matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, recursing into sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            free_l = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
            free_r = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in eqn.params["dimension_numbers"][1][1])
            total += 2 * math.prod(lhs[i] for i in lb) * math.prod(lhs[i] for i in lc) * free_l * free_r
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _matmul_flops(inner)
    return total


def _traced_forward_flops_per_token(cfg, batch: int) -> float:
    model = GLaM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((batch, cfg.seq_len), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens)
    return _matmul_flops(jaxpr.jaxpr) / (batch * cfg.seq_len)


@pytest.mark.parametrize("ffn_kind,tie", [("geglu", True), ("gelu", False)])
def test_dense_forward_flops_equal_traced_matmuls(ffn_kind, tie):
    cfg = model_config(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_head=24,
                       d_ff=64, ffn_kind=ffn_kind, tie_embeddings=tie)
    assert _traced_forward_flops_per_token(cfg, 2) == accounting.count(cfg).forward_flops_per_token


@pytest.mark.parametrize("axes", [{}, dict(granularity=2, shared_experts=1, expert_kind="geglu"),
                                  dict(granularity=4, shared_experts=2)])
def test_moe_forward_flops_equal_traced_matmuls(axes):
    """With E * C == K * S (capacity factor 1, no rounding) the gather path's expert matmuls are
    exactly the K activated experts (K x G of E x G at granularity G, the router counted, the
    shared experts beside them); the only extra matmul is the K-way combine (2 K M)."""
    cfg = model_config(vocab_size=50, seq_len=16, d_model=32, n_layers=4, n_heads=2, d_ff=64,
                       n_experts=4, top_k=2, **axes,
                       router={"capacity_factor": 1.0, "capacity_multiple": 1})
    counts = accounting.count(cfg)
    combine = counts.n_moe_layers * 2 * cfg.routed_top_k * cfg.d_model
    assert _traced_forward_flops_per_token(cfg, 2) == counts.forward_flops_per_token + combine


# GLaM Table 2, parameter columns (total, activated), in billions as printed in the paper
# (rounded there, hence the tolerances).
TABLE_2 = {
    "dense_1_7b": (1.700, 1.700), "glam_1_7b_64e": (27, 1.878),
    "glam_1_7b_128e": (53, 1.878), "glam_1_7b_256e": (105, 1.878), "dense_8b": (8.7, 8.7),
    "glam_8b_64e": (143, 9.8), "dense_137b": (137, 137), "glam_64b_64e": (1200, 96.6),
}


@pytest.mark.parametrize("name", sorted(TABLE_2))
def test_paper_presets_reproduce_table_2(name):
    total, activated = TABLE_2[name]
    c = accounting.count(load([f"model=paper/{name}"]).model)
    assert c.total_params / 1e9 == pytest.approx(total, rel=0.04)
    assert c.activated_params / 1e9 == pytest.approx(activated, rel=0.02)


def test_train_flops_are_three_forward_and_moe_activates_top_k():
    dense = accounting.count(load(["model=paper/dense_1_7b"]).model)
    moe = accounting.count(load(["model=paper/glam_1_7b_64e"]).model)
    assert dense.train_flops_per_token == 3 * dense.forward_flops_per_token
    # Same dense shape, half the FFNs now 2 of 64 two-matrix experts: activated > dense.
    assert moe.activated_params > dense.activated_params
    assert moe.total_params > 10 * moe.activated_params


def test_glam_count_cli_prints_json(capsys):
    count_main(["model=paper/glam_64b_64e"])
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == accounting.count(load(["model=paper/glam_64b_64e"]).model).total_params
    for key in ("total_params", "activated_params", "embedding_params", "forward_flops_per_token"):
        assert isinstance(out[key], int)
