"""One MLflow run per run directory, whatever the moment of interruption; stop signals end the
run KILLED and the process cleanly; a deleted or missing MLflow run does not block resuming."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

import waiting
from glam.checkpoint import Checkpointer
from glam.interrupts import Interrupted
from glam.resolve import load
from glam.trainer import run
from glam.trainer import SimulatedCrash

pytestmark = pytest.mark.slow  # every test here trains

BASE = ["model=tiny_moe", "train.steps=8", "train.batch_size=4", "train.log_every=2",
        "train.progress=false", "train.eval_batches=1", "checkpoint.every=2",
        "data.train_tokens=20000", "data.val_tokens=2048", "eval.max_examples=4",
        "eval.shots=[0]"]


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("glam")
    return client, client.search_runs([exp.experiment_id], run_view_type=3)  # active + deleted


def test_an_interruption_before_the_first_checkpoint_opens_no_second_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load([*BASE, f"logger.tracking_uri={uri}"])
    save = Checkpointer.save

    def interrupted_save(self, step, state, record, data_state=None):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(Checkpointer, "save", interrupted_save)
    with pytest.raises(Interrupted):
        run(cfg, tmp_path / "run")
    (first,) = _runs(uri)[1]
    assert first.info.status == "KILLED"
    monkeypatch.setattr(Checkpointer, "save", save)
    final = run(cfg, tmp_path / "run")
    client, runs = _runs(uri)
    assert [r.info.run_id for r in runs] == [first.info.run_id] == [final["run_id"]]
    assert client.get_run(final["run_id"]).info.status == "FINISHED"


def test_a_deleted_run_is_restored_and_a_missing_one_replaced(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(SimulatedCrash):  # checkpoint at step 2, crash at step 3
        run(load([*BASE, f"logger.tracking_uri={uri}", "faults.crash_at_step=3"]), tmp_path / "r")
    client, (crashed,) = _runs(uri)
    client.delete_run(crashed.info.run_id)
    final = run(load([*BASE, f"logger.tracking_uri={uri}"]), tmp_path / "r")
    assert final["run_id"] == crashed.info.run_id
    restored = client.get_run(final["run_id"])
    assert restored.info.status == "FINISHED" and restored.info.lifecycle_stage == "active"
    assert "restored" in restored.data.tags["recovered"]
    assert len(_runs(uri)[1]) == 1
    # The checkpoints' run is not in another store: a new run there continues them.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    again = run(load([*BASE, f"logger.tracking_uri={other}"]), tmp_path / "r")
    client, (replacement,) = _runs(other)
    assert replacement.info.run_id == again["run_id"] != final["run_id"]
    assert "new run" in replacement.data.tags["recovered"]


def test_sigterm_marks_the_run_killed_and_exits_cleanly_then_it_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["model=tiny_moe", "train.steps=3000", "train.batch_size=4", "train.log_every=50",
            "train.progress=false", "train.eval_batches=1", "checkpoint.every=100",
            "data.train_tokens=20000", "data.val_tokens=2048", "eval.max_examples=4",
            "eval.shots=[0]", "hydra.run.dir=run"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "glam.cli.train", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240 * waiting.SCALE
    while not (tmp_path / "run" / "checkpoints" / "100").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = waiting.communicate(proc, 120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "terminate" not in err
    client, (killed,) = _runs(uri)
    assert killed.info.status == "KILLED"
    done = waiting.run(cmd, 600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    client, (finished,) = _runs(uri)
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
