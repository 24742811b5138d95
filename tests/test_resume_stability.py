"""Checkpoints, exact resume, and the paper's stability practice under injected faults."""

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from glam.checkpoint import CheckpointError
from glam.config import ConfigError
from glam.count import load
from glam.stability import TrainingDiverged
from glam.train import SimulatedCrash, run

BASE = ["model=tiny_moe", "train.steps=30", "train.batch_size=4", "train.log_every=5",
        "train.progress=false", "train.eval_batches=1", "checkpoint.every=10",
        "schedule.warmup_steps=5", "data.train_tokens=20000", "data.val_tokens=2048"]


def _run(tmp_path, name, *overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load([*BASE, f"logger.tracking_uri={uri}", *overrides])
    return run(cfg, tmp_path / name), MlflowClient(uri)


def _history(client, run_id, key="lm_loss"):
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"duplicated steps in {key}"
    return steps, [p.value for p in points]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, client = _run(tmp_path, "straight")
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, "crashed", "faults.crash_at_step=17")
    exp = client.get_experiment_by_name("glam")
    crashed = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id != straight["run_id"]]
    assert len(crashed) == 1 and crashed[0].info.status == "FAILED"

    resumed, _ = _run(tmp_path, "crashed")  # same run directory, resume=auto
    assert resumed["run_id"] == crashed[0].info.run_id  # the MLflow run continues
    assert len(client.search_runs([exp.experiment_id])) == 2  # no new run
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"
    steps_a, loss_a = _history(client, straight["run_id"])
    steps_b, loss_b = _history(client, resumed["run_id"])
    assert steps_a == steps_b == list(range(30))
    np.testing.assert_array_equal(loss_a, loss_b)  # bit-identical on CPU
    assert resumed["val_loss"] == straight["val_loss"]


def test_resume_never_refuses_existing_checkpoints(tmp_path):
    _run(tmp_path, "r", "train.steps=10")
    with pytest.raises(ConfigError, match="train.resume"):
        _run(tmp_path, "r", "train.steps=10", "train.resume=never")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _run(tmp_path, "r", "train.steps=10")
    with pytest.raises(ConfigError, match=r"model\.d_model: checkpoint 32, config 48"):
        _run(tmp_path, "r", "train.steps=10", "model.d_model=48")


def test_corrupt_checkpoint_is_named(tmp_path):
    _run(tmp_path, "r", "train.steps=10")
    record = next((tmp_path / "r" / "checkpoints" / "10").rglob("*record*"))
    if record.is_dir():
        shutil.rmtree(record)
        record.mkdir()
    else:
        record.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoints/10 is unreadable"):
        _run(tmp_path, "r", "train.steps=20")


def test_nonfinite_steps_are_skipped(tmp_path):
    final, client = _run(tmp_path, "r", "faults.nonfinite_steps=[7,8,9]")
    assert final["skipped_steps"] == 3 and final["rollbacks"] == 0
    steps, losses = _history(client, final["run_id"])
    assert 7 not in steps and 6 in steps and 10 in steps and np.all(np.isfinite(losses))
    _, skipped = _history(client, final["run_id"], "skipped")
    assert sum(skipped) == 3


@pytest.mark.parametrize("fault,reason", [
    ("faults.spike_steps=[24]", "loss spike at step 24"),
    ("faults.nonfinite_steps=[21,22,23,24,25]", "5 consecutive non-finite steps"),
])
def test_rollback_then_recover(tmp_path, fault, reason):
    final, client = _run(tmp_path, "r", fault)
    assert final["rollbacks"] == 1
    run_ = client.get_run(final["run_id"])
    assert run_.info.status == "FINISHED"
    assert reason in run_.data.tags["rollback_1"] and "to step 20" in run_.data.tags["rollback_1"]
    steps, losses = _history(client, final["run_id"])
    assert steps == list(range(30))  # each step logged once, from the recovered trajectory
    assert max(losses) < 10
    rollbacks = json.loads((tmp_path / "r" / "rollbacks.json").read_text())
    assert rollbacks[0]["at_step"] >= 24 and reason in rollbacks[0]["reason"]


def test_give_up_after_max_rollbacks(tmp_path):
    with pytest.raises(TrainingDiverged, match="gave up after 2 rollbacks"):
        _run(tmp_path, "r", "faults.spike_steps=[24]", "faults.repeat_after_rollback=true",
             "stability.max_rollbacks=2")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run_,) = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert run_.info.status == "FAILED" and "rollback_2" in run_.data.tags
