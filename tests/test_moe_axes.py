"""The MoE design axes beyond GLaM: granularity, shared experts, auxiliary-loss-free balancing
by a selection bias, and sparse upcycling, each against a slow, obviously correct reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mlflow.tracking import MlflowClient

from glam import accounting
from glam.config import ConfigError
from glam.model import GLaM
from glam.model.moe import MoEFeedForward, update_router_bias
from glam.model.routing import top_k_gating
from glam.placement import coarse_counterpart
from glam.resolve import load, model_config
from glam.step import loss_fn
from glam.trainer import SimulatedCrash, Trainer, run


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("kind", ["gelu", "geglu"])
@pytest.mark.parametrize("granularity", [1, 2])
def test_shared_experts_are_a_dense_ffn_added_to_the_routed_output(kind, granularity):
    """A layer with shared experts = the same layer without them + a dense FFN of width
    shared x H x G (as the loop below computes it), on real and padded tokens."""
    fields = dict(vocab_size=16, d_model=16, d_ff=32, n_experts=4, granularity=granularity,
                  expert_kind=kind, router={"dispatch": "gather", "group_size": 8})
    with_shared = model_config(backend="cpu", shared_experts=2, **fields)
    layer = MoEFeedForward(with_shared, rngs=nnx.Rngs(0))
    routed_only = MoEFeedForward(model_config(backend="cpu", **fields), rngs=nnx.Rngs(0))
    for name in ("router", "w_in", "w_out") + (("w_gate",) if kind == "geglu" else ()):
        getattr(routed_only, name)[...] = getattr(layer, name)[...]
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    mask = jnp.array([[True] * 8, [True] * 5 + [False] * 3])
    y, _ = layer(x, mask=mask)
    y_routed, _ = routed_only(x, mask=mask)
    assert layer.shared.wi.shape == (16, 2 * with_shared.expert_d_ff)
    assert with_shared.expert_d_ff == 32 and with_shared.expert_hidden == 32 // granularity
    wi, wo = np.asarray(layer.shared.wi[...], np.float64), np.asarray(layer.shared.wo[...], np.float64)
    xs = np.asarray(x, np.float64)
    hidden = _gelu(xs @ wi) if kind == "gelu" else \
        _gelu(xs @ np.asarray(layer.shared.wi_gate[...], np.float64)) * (xs @ wi)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_routed) + hidden @ wo, atol=2e-5)


def test_granularity_keeps_expert_parameters_and_counts_the_router():
    """G experts G times narrower, top_k x G of n_experts x G: expert parameters and expert
    FLOPs those of G = 1, the router's FLOPs (2 M E G per token and MoE layer) counted."""
    base = dict(vocab_size=64, d_model=16, d_ff=64, n_experts=8)
    coarse = model_config(backend="cpu", **base)
    fine = model_config(backend="cpu", granularity=4, **base)
    assert (fine.routed_experts, fine.routed_top_k, fine.expert_d_ff, fine.expert_hidden) == \
        (32, 8, 64, 16)
    layer = MoEFeedForward(fine, rngs=nnx.Rngs(0))
    assert layer.router.shape == (16, 32) and layer.w_in.shape == (32, 16, 16)
    c, f = accounting.count(coarse), accounting.count(fine)
    assert f.expert_params == c.expert_params
    moe_layers = len(fine.moe_layers)
    router_growth = 2 * 16 * 8 * (4 - 1) * moe_layers
    assert f.forward_flops_per_token - c.forward_flops_per_token == router_growth
    assert f.total_params - c.total_params == 16 * 8 * 3 * moe_layers  # the router's weights
    assert accounting.count(coarse_counterpart(fine)) == c
    # matched placement: the width solved at G = 1, divided by G
    matched = model_config(backend="cpu", placement="matched", granularity=4, **base)
    solved = model_config(backend="cpu", placement="matched", **base)
    assert matched.expert_d_ff == solved.expert_d_ff == 46
    assert matched.expert_hidden == round(46 / 4)
    # an explicit width is the granularity-1 width too
    preset = model_config(backend="cpu", granularity=4, expert_d_ff=48, **base)
    assert preset.expert_hidden == 12
    for bad in (dict(granularity=3), dict(granularity=4, expert_d_ff=42)):
        with pytest.raises(ConfigError, match="model.granularity"):
            model_config(backend="cpu", **{**base, **bad})  # G does not divide the width


def test_a_granularity_study_that_moves_flops_beyond_the_tolerance_is_refused():
    from glam.study.plan import plan

    overrides = ["+study=granularity", "model.granularity=1,8", "train.seed=0"]
    assert len(plan(overrides)) == 2  # within the study's 5%
    with pytest.raises(ConfigError, match="(?s)plan.tolerance.*granularity=8.*granularity-1"):
        plan([*overrides, "plan.tolerance=0.02"])


def test_the_selection_bias_balances_a_skewed_router_without_an_aux_loss():
    """A fixed router on inputs skewed toward a few experts: the sign rule's biases bring the
    load violation (max load over mean, less 1) down; no loss, no gradient."""
    e, k, m = 8, 2, 16
    key = jax.random.split(jax.random.key(0), 3)
    router = jax.random.normal(key[0], (m, e))
    direction = router[:, 0] + router[:, 1]  # inputs lean toward experts 0 and 1

    def batch(key):
        return jax.random.normal(key, (4, 64, m)) + 3.0 * direction / jnp.linalg.norm(direction)

    route = jax.jit(lambda x, bias: top_k_gating(x @ router, top_k=k, capacity=64,
                                                 selection_bias=bias).stats["expert_load"])
    bias = jnp.zeros(e)
    before = float(route(batch(key[1]), bias).max() - 1)
    for step in range(300):
        load = route(batch(jax.random.fold_in(key[2], step)), bias)
        bias = update_router_bias(bias, load, 0.02)
    after = float(route(batch(key[1]), bias).max() - 1)
    assert before > 1.0, before  # the skew is real: the busiest expert takes twice its share
    assert after < 0.25 * before, (before, after)  # measured: 1.375 -> 0.125
    assert float(bias[0]) < 0 and float(bias[1]) < 0  # the favoured experts were pushed down


BASE = ["model=tiny_dense", "train.batch_size=4", "train.log_every=5", "train.progress=false",
        "train.eval_batches=1", "schedule.warmup_steps=5", "data.train_tokens=20000",
        "data.val_tokens=2048", "eval.max_examples=8", "eval.shots=[0]"]
MOE = ["model.n_experts=4", "model.expert_kind=geglu"]


def _load(tmp_path, *overrides):
    return load([*BASE, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides],
                "cpu")


@pytest.mark.slow
def test_bias_balancing_resumes_exactly(tmp_path):
    """The biases are checkpointed state: a run killed between checkpoints and resumed logs the
    uninterrupted run's losses and biases bit for bit, and exports the same biases."""
    common = ["model=tiny_moe", "train.steps=24", "checkpoint.every=10",
              "model.router.balance=bias", "model.router.bias_rate=0.01"]
    straight = run(_load(tmp_path, *common), tmp_path / "straight")
    with pytest.raises(SimulatedCrash):
        run(_load(tmp_path, *common, "faults.crash_at_step=17"), tmp_path / "crashed")
    resumed = run(_load(tmp_path, *common), tmp_path / "crashed")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in ("lm_loss", "moe/layer0/bias_range", "moe/layer0/load_violation"):
        histories = [[(m.step, m.value) for m in sorted(client.get_metric_history(r["run_id"], key),
                                                         key=lambda m: m.step)]
                     for r in (straight, resumed)]
        assert histories[0] == histories[1] and len(histories[0]) >= 4, key
    assert client.get_run(straight["run_id"]).data.metrics["moe/layer0/bias_range"] > 0
    from safetensors.numpy import load_file

    biases = [load_file(str(tmp_path / d / "model" / "model.safetensors"))["blocks.0.ffn.bias"]
              for d in ("straight", "crashed")]
    np.testing.assert_array_equal(*biases)
    assert np.any(biases[0] != 0)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A finished tiny dense run (GeGLU FFNs), exported: (its folder, its db dir)."""
    tmp = tmp_path_factory.mktemp("dense")
    run(_load(tmp, "train.steps=12", "checkpoint.every=0"), tmp / "dense")
    return tmp / "dense", tmp


@pytest.mark.slow
@pytest.mark.parametrize("routing", [
    ["model.router.dispatch=dropless"],
    ["model.router.dispatch=gather", "model.router.capacity_factor=2.0"],  # C = S: no drops
    ["model.router.dispatch=einsum", "model.router.gate_norm=after",
     "model.router.capacity_factor=2.0"]])
def test_an_upcycled_model_starts_at_the_dense_models_loss(dense_run, tmp_path, routing):
    """Every expert a copy of the dense FFN, the router random: the first loss is the dense
    model's to float tolerance (with nothing dropped), while the router is not the dense one."""
    from glam import export

    folder, _ = dense_run
    cfg = _load(tmp_path, *MOE, *routing, f"train.init_from={folder}", "train.steps=5")
    trainer = Trainer(cfg, tmp_path / "up")
    upcycled = nnx.merge(trainer.graphdef, trainer.state)[0]
    dense = export.load(folder).model
    tokens = jax.random.randint(jax.random.key(3), (4, cfg.model.seq_len + 1), 0,
                                cfg.model.vocab_size)
    dense_cfg = dataclasses.replace(cfg.model, n_experts=0)
    lm = [float(loss_fn(m, tokens, None, c)[1][0])
          for m, c in ((upcycled, cfg.model), (dense, dense_cfg))]
    assert lm[0] == pytest.approx(lm[1], abs=2e-5), lm
    ffn = upcycled.blocks[0].ffn
    np.testing.assert_array_equal(ffn.w_in[...][3], dense.blocks[0].ffn.wi[...])
    np.testing.assert_array_equal(ffn.w_gate[...][1], dense.blocks[0].ffn.wi_gate[...])
    assert float(jnp.std(ffn.router[...])) > 0.05


@pytest.mark.slow
def test_an_upcycled_run_spends_what_the_dense_run_left_of_the_budget(dense_run, tmp_path):
    folder, _ = dense_run
    spent = 12 * 4 * 32 * accounting.count(_load(tmp_path).model).train_flops_per_token
    moe = _load(tmp_path, *MOE)
    per_step = 4 * 32 * accounting.count(moe.model).train_flops_per_token
    budget = spent + 20 * per_step
    scratch = _load(tmp_path, *MOE, f"train.flops_budget={budget}")
    upcycled = _load(tmp_path, *MOE, f"train.flops_budget={budget}", f"train.init_from={folder}")
    assert upcycled.train.steps == 20
    assert scratch.train.steps == round(budget / per_step) > 20
    with pytest.raises(ConfigError, match="train.flops_budget.*spent"):
        _load(tmp_path, *MOE, f"train.flops_budget={spent / 2}", f"train.init_from={folder}")
    final = run(upcycled, tmp_path / "up")
    run_tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(final["run_id"])
    assert run_tags.data.params["train.init_from"] == str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,field", [
    (["model.n_experts=4"], "model.expert_kind"),  # gelu experts cannot copy a GeGLU FFN
    ([*MOE, "model.d_ff=128"], "train.init_from"),  # another shape
    ([*MOE, "model.granularity=2"], "model.granularity"),
    ([*MOE, "model.shared_experts=1"], "model.shared_experts"),
    ([*MOE, "plan.placement=matched"], "model.expert_d_ff"),
    ([*MOE, "model.top_k=1"], "model.top_k"),
    (["model.n_experts=0"], "model.n_experts"),
])
def test_a_model_that_cannot_be_upcycled_is_refused_naming_the_field(dense_run, tmp_path,
                                                                     overrides, field):
    folder, _ = dense_run
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _load(tmp_path, *overrides, f"train.init_from={folder}")


def test_moe_settings_of_a_dense_point_take_their_defaults(tmp_path):
    """A dense point of a granularity or balance sweep is the plain dense point (one run)."""
    from glam.identity import config_hash

    plain = _load(tmp_path)
    swept = _load(tmp_path, "model.granularity=4", "model.shared_experts=2",
                  "model.expert_kind=geglu", "model.router.balance=bias",
                  "model.router.bias_rate=0.5")
    assert config_hash(swept) == config_hash(plain)
    assert "model.granularity" in swept.derived.filled
    aux = _load(tmp_path, *MOE, "model.router.bias_rate=0.5")  # no bias: its rate does nothing
    assert aux.model.router.bias_rate == plain.model.router.bias_rate


@pytest.mark.slow
def test_a_damaged_dense_run_or_one_of_other_data_is_refused_before_compiling(dense_run,
                                                                             tmp_path):
    import json
    import shutil

    folder, _ = dense_run
    other = _load(tmp_path, *MOE, "data.seed=7", f"train.init_from={folder}")
    with pytest.raises(ConfigError, match="train.init_from: .*another tokenizer"):
        Trainer(other, tmp_path / "other")
    damaged = shutil.copytree(folder / "model", tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = _load(tmp_path, *MOE, f"train.init_from={damaged}")
    with pytest.raises(ConfigError, match="train.init_from: .*model.safetensors"):
        Trainer(cfg, tmp_path / "damaged_run")
    saved = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**saved, "trained": "abc"}))
    with pytest.raises(ConfigError, match="train.init_from: .*trained.train_flops"):
        _load(tmp_path, *MOE, f"train.init_from={damaged}")


def test_upcycling_from_nothing_or_from_an_moe_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from: no exported model"):
        _load(tmp_path, *MOE, f"train.init_from={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="train.init_from: is empty"):
        _load(tmp_path, *MOE, "train.init_from=")
    from glam import export
    from glam.data.tokenizer import WordTokenizer

    moe = _load(tmp_path, *MOE).model
    params = jax.device_get(nnx.to_pure_dict(nnx.state(GLaM(moe, rngs=nnx.Rngs(0)), nnx.Param)))
    export.save(tmp_path / "moe", params, moe, WordTokenizer(["a", "b"]))
    with pytest.raises(ConfigError, match="is an MoE model"):
        _load(tmp_path, *MOE, f"train.init_from={tmp_path / 'moe'}")
