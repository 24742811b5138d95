"""MLflow under concurrency and failure: parallel first use of a new sqlite database."""

import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

import waiting

OPEN_ONE_RUN = """
import sys, time
from glam.tracking import Tracker
uri, i, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))  # all processes reach the database together
with Tracker(uri, "parallel", f"run{i}", {"i": i}, {"i": i}) as tracker:
    tracker.log_metrics(0, {"loss": 1.0})
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parallel_first_use_of_a_new_sqlite_database(tmp_path):
    """Six processes open runs at the same moment on a database that does not exist yet: all
    finish, and the database stays usable."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_at = time.time() + 15  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_ONE_RUN, uri, str(i), str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    outputs = [waiting.communicate(p, 300) for p in procs]
    failed = [err[-1500:] for p, (_, err) in zip(procs, outputs) if p.returncode]
    assert not failed, failed[0]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    client.create_run(exp.experiment_id)  # still usable


def _start_server(tmp_path, port):
    import os
    import signal
    import urllib.request
    from pathlib import Path

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 90 * waiting.SCALE
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("the MLflow server did not start")


def _stop_server(server):
    import os
    import signal

    os.killpg(server.pid, signal.SIGKILL)  # the whole group: the server's workers too
    server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_training_goes_on_through_a_tracking_outage_and_loses_nothing(tmp_path, free_port):
    """The tracking server goes away after the first checkpoint and comes back later: training
    keeps its pace meanwhile, and in the end every step's point is in MLflow."""
    import os

    port = free_port()
    server = _start_server(tmp_path, port)
    steps = 3000
    args = ["model=tiny_moe", f"train.steps={steps}", "train.batch_size=4", "train.log_every=20",
            "train.progress=false", "train.eval_batches=1", "checkpoint.every=200",
            "data.train_tokens=20000", "data.val_tokens=2048", "eval.max_examples=4",
            "eval.shots=[0]", "hydra.run.dir=run", f"logger.tracking_uri=http://127.0.0.1:{port}"]
    train = subprocess.Popen([sys.executable, "-m", "glam.cli.train", *args], cwd=tmp_path,
                             env={k: v for k, v in os.environ.items()
                                  if k != "MLFLOW_TRACKING_URI"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "run" / "checkpoints"

    def wait_for(step, seconds):
        deadline = time.monotonic() + seconds * waiting.SCALE
        while not (checkpoints / str(step)).exists() and train.poll() is None:
            assert time.monotonic() < deadline, f"no checkpoint {step} after {seconds} s"
            time.sleep(0.1)

    try:
        wait_for(200, 240)
        _stop_server(server)
        wait_for(1000, 120)  # four more checkpoints with MLflow away: training did not stall
        server = _start_server(tmp_path, port)
        out, err = waiting.communicate(train, 600)
        assert train.returncode == 0, err[-3000:]
        assert "MLflow unreachable" in out + err
        client = MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "lm_loss")
        assert sorted(m.step for m in history) == list(range(steps))
    finally:
        train.kill()
        _stop_server(server)
