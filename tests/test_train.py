"""A training smoke test whose loss must fall, and MLflow runs written and read back."""

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from glam.count import load
from glam.train import run


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load(["model=tiny_moe", "train.steps=80", "train.batch_size=8", "train.log_every=20",
                "train.progress=false", "train.eval_batches=2", "logger.flush_every=30",
                "schedule.warmup_steps=10", "data.train_tokens=50000", "data.val_tokens=4096",
                f"logger.tracking_uri={uri}", "logger.experiment=test"])
    final = run(cfg, tmp / "out")
    return cfg, final, MlflowClient(uri), tmp


def test_loss_decreases(moe_run):
    cfg, final, client, _ = moe_run
    history = [m.value for m in sorted(client.get_metric_history(final["run_id"], "lm_loss"),
                                       key=lambda m: m.step)]
    assert len(history) == cfg.train.steps
    assert np.mean(history[-10:]) < np.mean(history[:10]) - 0.3
    assert final["val_loss"] < np.log(cfg.data.vocab_size)  # better than uniform guessing


def test_mlflow_run_read_back(moe_run):
    cfg, final, client, tmp = moe_run
    run_ = client.get_run(final["run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["model.n_experts"] == "4"
    assert int(run_.data.params["counts.total_params"]) > int(run_.data.params["counts.activated_params"])
    assert run_.data.tags["family"] == "moe"
    for key in ("val_loss", "aux_loss", "z_loss", "learning_rate", "train_flops",
                "moe/layer0/dropped_top1", "moe/layer0/routed_2", "tokens_per_second"):
        assert key in run_.data.metrics, key
    steps = [m.step for m in client.get_metric_history(final["run_id"], "aux_loss")]
    assert steps == list(range(cfg.train.steps))  # one point per step, none duplicated
    artifacts = {a.path for a in client.list_artifacts(final["run_id"])}
    assert {"config.yaml", "expert_load.json"} <= artifacts
    assert (tmp / "out" / "config.yaml").read_text().count("n_experts: 4") == 1


def _glam_train(args, cwd, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "glam.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


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


def test_cli_bad_config_fails_before_any_work(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _glam_train(["model=tiny_moe", "model.top_k=7"], tmp_path, uri)
    assert proc.returncode != 0
    assert "model.top_k" in proc.stderr and "n_experts=4" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run was started
