"""Multi-host: initialisation from config and cluster environments, and a real 2-process run."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import waiting
from glam.config import ConfigError, DistributedConfig
from glam.distributed import agree, detect_cluster, fetch, initialize_args

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}


@pytest.mark.parametrize("cfg,environ,expected", [
    (DistributedConfig(), {}, None),  # a plain single process
    (DistributedConfig(num_processes=1), {}, None),
    (DistributedConfig(init="never"), {**SLURM, "SLURM_NTASKS": "2"}, None),
    (DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), {},
     {"coordinator_address": "10.0.0.1:1234", "coordinator_bind_address": "10.0.0.1:1234",
      "num_processes": 2, "process_id": 1}),
    # srun, one task per host: that task gets all 8 GPUs of its host
    (DistributedConfig(), {**SLURM, "SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "8"},
     {"local_device_ids": list(range(8))}),
    # srun, one task per GPU: each its own, as JAX's SLURM detection would do
    (DistributedConfig(), {**SLURM, "SLURM_NTASKS": "16", "SLURM_GPUS_ON_NODE": "8"},
     {"local_device_ids": [0]}),
    # two tasks per host: the second task of a host takes GPUs 4-7
    (DistributedConfig(), {**SLURM, "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                           "SLURM_GPUS_ON_NODE": "8"}, {"local_device_ids": [4, 5, 6, 7]}),
    (DistributedConfig(), {**SLURM, "SLURM_NTASKS": "2"}, {}),  # no GPUs: JAX decides
    (DistributedConfig(), {**SLURM, "SLURM_NTASKS": "1"}, None),  # an sbatch with one task
    (DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, {}),  # a TPU pod slice
    (DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "t1"}, None),  # a single TPU host
    (DistributedConfig(init="always"), {}, {}),
])
def test_initialize_args(cfg, environ, expected):
    assert initialize_args(cfg, environ) == expected


def test_detect_cluster():
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
    assert detect_cluster({**SLURM, "SLURM_NTASKS": "2"}) == "slurm"
    assert detect_cluster({"SLURM_NTASKS": "2"}) is None  # not inside a job step


def test_missing_coordinator_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"distributed.coordinator_address and "
                                          r"distributed.process_id unset"):
        initialize_args(DistributedConfig(num_processes=4), {})


def test_single_process_helpers():
    import jax.numpy as jnp

    agree("same everywhere", "anything")  # one process: nothing to compare
    out = fetch({"x": jnp.arange(3), "step": 7})
    assert isinstance(out["x"], np.ndarray) and out["step"] == 7


def _train(run_dir, uri, *overrides, log, env=None, multirun=False):
    args = ["model=tiny_moe", "train.steps=8", "train.batch_size=8", "train.log_every=1",
            "train.progress=false", "train.eval_batches=1", "checkpoint.every=2",
            "data.train_tokens=20000", "data.val_tokens=2048", "eval.max_examples=8",
            "eval.shots=[0]", "eval.batch_size=8", f"logger.tracking_uri={uri}",
            f"hydra.run.dir={run_dir}", *overrides]
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    flags = ["--multirun"] if multirun else []
    with open(log, "w") as out:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "glam.cli.train", *flags, *args],
                                env={**base, "JAX_PLATFORMS": "cpu", **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait(procs, logs, timeout=240):
    codes = waiting.wait(procs, timeout, logs)
    return codes, [path.read_text() for path in logs]


def _losses(client, run_id):
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "lm_loss"))
    return [s for s, _ in points], np.array([v for _, v in points])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("devices", [1, 2])  # 1: the usual layout of one process per GPU
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path, free_port,
                                                                     devices):
    """Two processes on localhost (`devices` fake CPU devices each) train a tiny MoE expert
    parallel (2-way, and 2-way data parallel with 2 devices each) and are killed after step 6;
    one process (one device) resumes their checkpoint and finishes. Every loss equals an
    uninterrupted one-process run's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [_train(tmp_path / "shared", uri, "mesh.data=-1", "mesh.expert=2",
                    "faults.crash_at_step=6", f"distributed.coordinator_address=127.0.0.1:{port}",
                    "distributed.num_processes=2", f"distributed.process_id={i}",
                    env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
                    log=logs[i])
             for i in range(2)]
    codes, texts = _wait(procs, logs)
    # (process 1 logs warnings only)
    assert f"process 0 of 2: {devices} local of {2 * devices} devices" in texts[0], texts[0][-3000:]
    for text in texts:
        assert "SimulatedCrash: faults.crash_at_step=6" in text, text[-3000:]
    assert codes == [1, 1]

    resume_log = tmp_path / "resume.log"
    codes, [resumed] = _wait([_train(tmp_path / "shared", uri, log=resume_log)],
                             [resume_log])
    assert codes == [0], resumed[-3000:]
    start = int(re.search(r"resuming MLflow run \w+ from step (\d+)", resumed).group(1))
    assert start == 6  # the checkpoint the two processes wrote together before the crash

    ref_log = tmp_path / "reference.log"
    codes, [ref] = _wait([_train(tmp_path / "single", uri, log=ref_log)], [ref_log])
    assert codes == [0], ref[-3000:]

    client = MlflowClient(uri)
    runs = {r.data.tags["output_dir"]: r for r in
            client.search_runs([client.get_experiment_by_name("glam").experiment_id])}
    assert len(runs) == 2  # process 1 created no run; the resumed run continued process 0's
    shared, single = runs[str(tmp_path / "shared")], runs[str(tmp_path / "single")]
    steps, losses = _losses(client, shared.info.run_id)
    ref_steps, ref_losses = _losses(client, single.info.run_id)
    assert steps == ref_steps == list(range(8))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(shared.data.metrics["val_loss"], single.data.metrics["val_loss"],
                               rtol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_different_run_directories_are_refused_on_every_process(tmp_path, free_port):
    port = free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [_train(tmp_path / f"dir{i}", f"sqlite:///{tmp_path / 'mlflow.db'}",
                    f"distributed.coordinator_address=127.0.0.1:{port}",
                    "distributed.num_processes=2", f"distributed.process_id={i}", log=logs[i],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
             for i in range(2)]
    codes, texts = _wait(procs, logs, timeout=120)
    assert codes == [2, 2]  # a configuration error: the message alone
    for text in texts:
        assert "hydra.run.dir (set it to one shared path on every process): " \
               "processes [1] differ from process 0" in text, text[-2000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hydra_submitit_tasks_form_one_run(tmp_path):
    """The SLURM launch path on one machine: Hydra's submitit launcher starts 2 tasks of one
    study point (as `slurm_gpu_hosts` starts one per host); they join one JAX program over 4
    devices and produce one MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "launcher.log"
    proc = _train(tmp_path / "unused", uri, "hydra/launcher=submitit_local",
                  "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=4",
                  f"hydra.sweep.dir={tmp_path / 'multirun'}", "train.steps=4", "mesh.data=-1",
                  "mesh.expert=2", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                  log=log, multirun=True)
    codes, [text] = _wait([proc], [log])
    task_logs = "".join(p.read_text() for p in (tmp_path / "multirun").rglob("*_log.out"))
    assert codes == [0], text[-2000:] + task_logs[-3000:]
    assert "process 0 of 2: 2 local of 4 devices" in task_logs
    assert "process 1 of 2: 2 local of 4 devices" in task_logs
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert run.info.status == "FINISHED"
    assert _losses(client, run.info.run_id)[0] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_stop_signal_to_one_process_stops_both_at_the_same_step(tmp_path, free_port):
    """SIGTERM reaches process 1 only: the signal is shared at the next health check, so both
    processes stop together (neither waits forever in a collective) and the run is KILLED."""
    import signal

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = free_port()
    args = ["model=tiny_moe", "train.steps=5000", "train.batch_size=8", "train.log_every=10",
            "train.progress=false", "train.eval_batches=1", "checkpoint.every=100",
            "data.train_tokens=20000", "data.val_tokens=2048", "eval.max_examples=8",
            "eval.shots=[0]", f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}",
            f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2"]
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "glam.cli.train", *args, f"distributed.process_id={i}"],
                env={**base, "JAX_PLATFORMS": "cpu",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                stdout=out, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 240 * waiting.SCALE
    while not (tmp_path / "run" / "checkpoints" / "100").exists():
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
            logs[0].read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes, texts = _wait(procs, logs, timeout=120)
    assert codes == [128 + signal.SIGTERM] * 2, texts[0][-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_on_prepared_text_with_one_iterator_state_each(tmp_path, free_port,
                                                                          pydocs):
    """Each process reads its own share of the documents (grain, every 2nd document) and
    builds its rows of the global batch; each saves its iterator's state in the checkpoint and
    a resumed pair continues from it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]

    def pair(*overrides):
        port = free_port()
        return _wait([_train(tmp_path / "shared", uri, *pydocs, "mesh.data=-1", *overrides,
                             f"distributed.coordinator_address=127.0.0.1:{port}",
                             "distributed.num_processes=2", f"distributed.process_id={i}",
                             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                             log=logs[i])
                      for i in range(2)], logs)

    codes, texts = pair("faults.crash_at_step=5")
    assert codes == [1, 1], texts[0][-3000:]
    data = tmp_path / "shared" / "checkpoints" / "4" / "data"
    states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] != states[1]  # two iterators, each at its own position
    codes, texts = pair()
    assert codes == [0, 0], texts[0][-3000:]
    assert "resuming MLflow run" in texts[0] and "from step 4" in texts[0]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("glam").experiment_id])
    steps, losses = _losses(client, run.info.run_id)
    assert steps == list(range(8)) and np.isfinite(losses).all()
    assert {"val_loss/reference", "val_loss/docstrings"} <= run.data.metrics.keys()
