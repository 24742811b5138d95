"""A training smoke test whose loss must fall, and MLflow runs written and read back."""

import os
import re
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import waiting
from glam.resolve import load
from glam.trainer import run


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load(["model=tiny_moe", "train.steps=80", "train.batch_size=8", "train.log_every=20",
                "train.progress=false", "train.eval_batches=2", "checkpoint.every=30",
                "eval.every=40", "eval.max_examples=20",
                "schedule.warmup_steps=10", "data.train_tokens=50000", "data.val_tokens=4096",
                f"logger.tracking_uri={uri}", "logger.experiment=test",
                "logger.register_model=tiny-glam"])
    final = run(cfg, tmp / "out")
    return cfg, final, MlflowClient(uri), tmp


@pytest.mark.slow
def test_loss_decreases(moe_run):
    cfg, final, client, _ = moe_run
    history = [m.value for m in sorted(client.get_metric_history(final["run_id"], "lm_loss"),
                                       key=lambda m: m.step)]
    assert len(history) == cfg.train.steps
    assert np.mean(history[-10:]) < np.mean(history[:10]) - 0.3
    assert final["val_loss"] < np.log(cfg.model.vocab_size)  # better than uniform guessing


@pytest.mark.slow
def test_mlflow_run_read_back(moe_run):
    cfg, final, client, tmp = moe_run
    run_ = client.get_run(final["run_id"])
    assert run_.info.status == "FINISHED"
    assert re.fullmatch(r"moe-E4-[\d.]+K-[\d.]+Ktok-s0", run_.info.run_name)  # E, size, tokens, seed
    params, tags, metrics = run_.data.params, run_.data.tags, run_.data.metrics
    assert params["model.n_experts"] == "4" and params["model.router.capacity_factor"] == "1.25"
    assert int(params["model.vocab_size"]) == cfg.model.vocab_size  # derived value, not null
    assert int(params["counts.total_params"]) > int(params["counts.activated_params"])
    assert float(params["corpus.knowledge_bits"]) > 0
    assert float(params["corpus.fact_exposures_mean"]) > 0
    for key in ("family", "n_experts", "top_k", "total_params", "activated_params",
                "forward_flops_per_token", "git_sha", "data_fingerprint", "seed"):
        assert key in tags, key
    assert tags["family"] == "moe" and tags["top_k"] == "2"
    for key in ("lm_loss", "loss", "aux_loss", "z_loss", "learning_rate", "grad_norm",
                "skipped_steps", "tokens_per_second", "train_flops", "train_flops_total",
                "moe/layer0/load_max", "moe/layer0/dropped_top1", "moe/layer0/aux_loss",
                "val_loss", "eval/world_qa/0shot", "eval/world_facts/3shot",
                "eval/nlg_avg/1shot", "eval/nlu_avg/0shot", "setup_seconds", "compile_seconds",
                "train_seconds", "knowledge/bits", "knowledge/bits_per_activated_param",
                "knowledge/qa_seen/fraction", "knowledge/bio_only/bits_per_param"):
        assert key in metrics, key
    assert 0 <= metrics["knowledge/fraction"] <= 1
    assert sorted(m.step for m in client.get_metric_history(final["run_id"],
                                                            "knowledge/bits")) == [40, 80]
    assert metrics["setup_seconds"] > 0
    evals = client.get_metric_history(final["run_id"], "eval/world_facts/0shot")
    assert sorted(m.step for m in evals) == [40, 80]  # periodic, then final
    # the provisional live series: a point at every health check (every 20 steps, and at the
    # checkpoint after step 30), before any checkpoint covers it
    live = [m.step for m in client.get_metric_history(final["run_id"], "live/lm_loss")]
    assert live == [19, 29, 39, 59, 79]
    steps = [m.step for m in client.get_metric_history(final["run_id"], "aux_loss")]
    assert steps == list(range(cfg.train.steps))  # one point per step, none duplicated
    flops = sorted(client.get_metric_history(final["run_id"], "train_flops"), key=lambda m: m.step)
    assert flops[1].value - flops[0].value == cfg.train.batch_size * cfg.model.seq_len * int(
        params["counts.train_flops_per_token"])
    artifacts = {a.path for a in client.list_artifacts(final["run_id"])}
    assert {"config.yaml", "final_metrics.json", "eval_predictions.jsonl",
            "expert_load.json"} <= artifacts
    assert (tmp / "out" / "config.yaml").read_text().count("n_experts: 4") == 1
    # MLflow's own fields: the source, the training data as an input, the experiment's kind
    assert tags["mlflow.source.git.commit"] == tags["git_sha"] and tags["mlflow.source.name"]
    [data] = run_.inputs.dataset_inputs
    assert data.dataset.digest == tags["data_fingerprint"][:36]
    assert data.dataset.name == "world-train" and "knowledge_bits" in data.dataset.profile
    assert {t.key: t.value for t in data.tags}["mlflow.data.context"] == "training"
    experiment = client.get_experiment(run_.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_names_lead_with_what_tells_points_apart():
    """The UI's name column is narrow: family and E first, then size, tokens, filter, seed."""
    from glam.accounting import count
    from glam.run_logger import run_name

    def name(*overrides):
        cfg = load(["model=tiny_moe", "train.steps=100", "train.batch_size=8", *overrides], "cpu")
        return run_name(cfg, count(cfg.model).activated_params)

    assert re.fullmatch(r"moe-E4-[\d.]+K-25.6Ktok-s0", name())
    dense = name("model.n_experts=0")  # the dense point of an MoE preset
    assert dense.startswith("dense-") and "moe" not in dense
    assert name("train.steps=200") != name() and name("train.seed=1").endswith("-s1")


def _glam_train(args, cwd, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "glam.cli.train", *args]
    return waiting.run(cmd, 300, cwd=cwd, env=env)


@pytest.mark.slow
def test_cli_multirun_dense_and_moe(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["train.steps=5", "train.batch_size=4", "train.eval_batches=1", "train.progress=false",
              "data.train_tokens=20000", "data.val_tokens=2048"]
    proc = _glam_train(["-m", "model=tiny_dense,tiny_moe", *common], tmp_path, uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert sorted(r.data.tags["family"] for r in runs) == ["dense", "moe"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "outputs" / "multirun").is_dir()


@pytest.mark.slow
def test_cli_bad_config_fails_before_any_work(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _glam_train(["model=tiny_moe", "model.top_k=7"], tmp_path, uri)
    assert proc.returncode == 2  # the message alone, no traceback
    assert "model.top_k" in proc.stderr and "n_experts=4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run was started


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_written_or_printed(tmp_path):
    """Nothing answers at the URI, so the run stops at the reachability check; by then Hydra
    has written the overrides and config into the run directory: the password is gone from
    them, and from what was printed."""
    proc = _glam_train(["model=tiny_moe", "hydra.run.dir=run",
                        "logger.tracking_uri=http://ann:s3cret@127.0.0.1:9"], tmp_path,
                       "sqlite:///unused.db")
    assert proc.returncode == 2 and "http://ann:***@127.0.0.1:9" in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not [p for p in written if "s3cret" in p.read_text()]


@pytest.mark.slow
def test_a_second_identical_run_loads_its_programs_from_the_compilation_cache(tmp_path):
    """Two runs of one config sharing train.compilation_cache_dir: the first compiles and
    stores its programs, the second compiles none (cache hits) and reaches bit-identical
    results."""
    from glam import compile_cache

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["model=tiny_moe", "train.steps=4", "train.batch_size=4", "train.progress=false",
                 "train.eval_batches=1", "checkpoint.every=0", "eval.max_examples=4",
                 "eval.shots=[0]", "data.train_tokens=20000", "data.val_tokens=2048",
                 f"logger.tracking_uri={uri}",
                 f"train.compilation_cache_dir={tmp_path / 'jax_cache'}"]
    try:
        first = run(load(overrides), tmp_path / "first")
        second = run(load(overrides), tmp_path / "second")
    finally:
        compile_cache.use(None)
    assert first["compile_cache_misses"] > 0 and first["compile_cache_hits"] == 0
    # nothing compiled again: each program loaded from the folder (or, for the few jitted
    # helpers this process still holds from the first run, from memory)
    assert second["compile_cache_hits"] > 0 and second["compile_cache_misses"] == 0
    assert any((tmp_path / "jax_cache").iterdir())
    for key in ("val_loss", "eval/world_facts/0shot"):
        assert second[key] == first[key], key


def test_training_time_leaves_out_evaluations_and_checkpoints(monkeypatch):
    """Throughput on a fake clock: compilation to the first result, training between checks,
    and an 8 s evaluation after a check not counted as training."""
    from glam import trainer

    clock = iter([0.0, 1.0, 2.0, 10.0, 11.0])
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(clock))
    timer = trainer.Throughput(tokens_per_step=10)  # 0: start
    timer.first_step({})  # 1: the first step's result
    timer.checked(5)  # 2: five steps trained
    timer.restart()  # 10: after an evaluation
    timer.checked(5)  # 11: five more
    assert timer.as_dict() == {"compile_seconds": 1.0, "train_seconds": 2.0,
                               "tokens_per_second": 50.0}


@pytest.mark.slow
def test_a_relaunched_run_registers_its_model_once(moe_run):
    """The finished run launched again (same run directory) resumes its MLflow run and exports
    again, but `logger.register_model` adds no second version for the same run."""
    cfg, final, client, tmp = moe_run
    assert run(cfg, tmp / "out")["run_id"] == final["run_id"]
    [version] = client.search_model_versions("name='tiny-glam'")
    assert version.run_id == final["run_id"]


@pytest.mark.slow
def test_the_trained_model_is_exported_and_generates(moe_run, capsys):
    """The run ends by exporting its model (safetensors, config, tokenizer) into the run
    directory and as the MLflow artifact model/; glam-generate loads it either way."""
    from glam import export
    from glam.cli.generate import main as generate_main

    cfg, final, client, tmp = moe_run
    folder = tmp / "out" / "model"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json",
                                                  "vocab.json"}
    artifacts = {a.path for a in client.list_artifacts(final["run_id"], "model")}
    assert artifacts == {"model/model.safetensors", "model/config.json", "model/vocab.json"}
    [version] = client.search_model_versions("name='tiny-glam'")  # logger.register_model
    assert version.run_id == final["run_id"] and version.source.endswith("model")
    loaded = export.load(final["run_id"], tracking_uri=client.tracking_uri)
    assert loaded.config.n_experts == cfg.model.n_experts and loaded.run_id == final["run_id"]
    generate_main([str(tmp / "out"), "--prompt", "q :", "--max-new-tokens", "3",
                   "--temperature", "0.7", "--top-k", "5"])
    said = capsys.readouterr().out
    assert said.startswith("q : >>> ") and len(said.split(">>>")[1].split()) >= 1
    with pytest.raises(SystemExit):
        generate_main([str(tmp / "nothing"), "--prompt", "q :"])


COUNT_MODEL_CHECKS = """
import sys
from glam.config import ModelConfig
calls, check = [], ModelConfig.check
def counted(self, *args, **kwargs):
    calls.append(1)
    return check(self, *args, **kwargs)
ModelConfig.check = counted
from glam.cli.train import main
try:
    main()
finally:
    print("MODEL CHECKS", len(calls))
"""


@pytest.mark.slow
def test_a_glam_train_run_checks_its_model_section_at_most_twice(tmp_path):
    """The config is resolved once per run: the model section is checked when the composed
    config is read (`glam.resolve.raw`) and once more with its derived values filled."""
    args = ["model=tiny_moe", "train.steps=2", "train.batch_size=4", "checkpoint.every=0",
            "train.eval_batches=1", "data.train_tokens=5000", "data.val_tokens=2000",
            "eval.max_examples=4", "eval.shots=[0]", "train.progress=false",
            f"hydra.run.dir={tmp_path / 'run'}", f"logger.tracking_uri=sqlite:///{tmp_path}/m.db"]
    out = waiting.run([sys.executable, "-c", COUNT_MODEL_CHECKS, *args], 300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    count = int(out.stdout.split("MODEL CHECKS")[-1])
    assert 1 <= count <= 2, count
