"""The helpers that wait on subprocesses: a process past its (scaled) limit fails the test with
what it said, and is not left running."""

import sys

import pytest

import waiting

TALKS_THEN_HANGS = "import sys, time; print('said before hanging', flush=True); time.sleep(60)"


def test_a_run_past_its_limit_fails_with_the_output():
    with pytest.raises(pytest.fail.Exception, match="said before hanging"):
        waiting.run([sys.executable, "-c", TALKS_THEN_HANGS], 2 / waiting.SCALE)


def test_a_wait_past_its_limit_fails_with_the_logs_and_kills(tmp_path):
    import subprocess

    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", TALKS_THEN_HANGS], stdout=out)
    with pytest.raises(pytest.fail.Exception, match="said before hanging"):
        waiting.wait([proc], 2 / waiting.SCALE, [log])
    assert proc.wait(timeout=10) != 0  # killed


def test_communicate_past_its_limit_fails_with_the_output():
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", TALKS_THEN_HANGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with pytest.raises(pytest.fail.Exception, match="said before hanging"):
        waiting.communicate(proc, 2 / waiting.SCALE)
    assert proc.wait(timeout=10) != 0  # killed


def test_a_run_past_its_limit_kills_what_it_started(tmp_path):
    """A launcher's workers (joblib, Dask) die with it: the process group is killed."""
    import os
    import time

    pid_file = tmp_path / "grandchild.pid"
    starts_a_worker = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                       "'import time; time.sleep(60)']); "
                       f"open({str(pid_file)!r}, 'w').write(str(p.pid)); "
                       "print('said before hanging', flush=True); time.sleep(60)")
    with pytest.raises(pytest.fail.Exception, match="said before hanging"):
        waiting.run([sys.executable, "-c", starts_a_worker], 3 / waiting.SCALE)
    worker = int(pid_file.read_text())
    for _ in range(50):  # reaped by init once killed
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} still runs")
