"""Waiting on subprocesses in tests: limits that survive a loaded machine, and a failure that
shows what the subprocess said.

The limits in the tests stop a hung process; they are not timings. Each is multiplied by
GLAM_TEST_TIMEOUT_SCALE (default 3: the suite's two workers, each starting processes, on two
cores under other load). A process past its limit is killed, with the processes it started
when it leads its own process group, and the test fails with its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCALE = float(os.environ.get("GLAM_TEST_TIMEOUT_SCALE", "3"))


def _tail(text, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def _kill(proc: subprocess.Popen) -> None:
    """Kill `proc`, and its process group when it leads one (its launcher's or Dask's workers
    would otherwise go on loading the machine)."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
            return
    except ProcessLookupError:
        return
    proc.kill()


def run(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)` within `timeout` x SCALE
    seconds, in a process group of its own; past it the group is killed and the test fails with
    the process's output so far."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        out, err = communicate(proc, timeout, what=" ".join(map(str, cmd))[:300])
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait(procs: list[subprocess.Popen], timeout: float,
         logs: list[Path] | None = None) -> list[int]:
    """The exit codes of `procs`, all within `timeout` x SCALE seconds together; past it every
    process is killed and the test fails with the tail of each log (their stdout and stderr)."""
    deadline = time.monotonic() + timeout * SCALE
    try:
        return [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        said = "\n".join(f"--- {path}:\n{_tail(path.read_text(errors='replace'))}"
                         for path in logs or [])
        pytest.fail(f"a process still running after {timeout * SCALE:.0f} s "
                    f"(GLAM_TEST_TIMEOUT_SCALE={SCALE}):\n{said}")
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)


def communicate(proc: subprocess.Popen, timeout: float, what: str = "a process") -> tuple[str, str]:
    """`proc.communicate()` (its stdout and stderr, read as it writes them) within `timeout` x
    SCALE seconds; past it the process is killed and the test fails with its output."""
    try:
        return proc.communicate(timeout=timeout * SCALE)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        pytest.fail(f"{what} still running after {timeout * SCALE:.0f} s "
                    f"(GLAM_TEST_TIMEOUT_SCALE={SCALE}); its output:\n{_tail(out)}\n"
                    f"{_tail(err)}")
