"""MLflow under concurrency and failure: parallel first use of a new sqlite database."""

import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

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
    outputs = [p.communicate(timeout=300) for p in procs]
    failed = [err[-1500:] for p, (_, err) in zip(procs, outputs) if p.returncode]
    assert not failed, failed[0]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    client.create_run(exp.experiment_id)  # still usable
