"""Waiting on subprocesses in tests: limits that survive a loaded machine, and a failure that
shows what the subprocess said.

The limits in the tests stop a hung process; they are not timings. Each is multiplied by
GLAM_TEST_TIMEOUT_SCALE (default 3: the suite's two workers, each starting processes, on two
cores under other load). A process past its limit is killed and the test fails with its output.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCALE = float(os.environ.get("GLAM_TEST_TIMEOUT_SCALE", "3"))


def _tail(text, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)` within `timeout` x SCALE
    seconds; past it the test fails with the process's output so far."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * SCALE,
                              **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(map(str, cmd))[:300]}\nstill running after {err.timeout:.0f} s "
                    f"(GLAM_TEST_TIMEOUT_SCALE={SCALE}); its output:\n{_tail(err.stdout)}\n"
                    f"{_tail(err.stderr)}")


def wait(procs: list[subprocess.Popen], timeout: float,
         logs: list[Path] | None = None) -> list[int]:
    """The exit codes of `procs`, all within `timeout` x SCALE seconds; past it every process
    is killed and the test fails with the tail of each log (their stdout and stderr)."""
    try:
        return [p.wait(timeout=timeout * SCALE) for p in procs]
    except subprocess.TimeoutExpired as err:
        said = "\n".join(f"--- {path}:\n{_tail(path.read_text(errors='replace'))}"
                         for path in logs or [])
        pytest.fail(f"a process still running after {err.timeout:.0f} s "
                    f"(GLAM_TEST_TIMEOUT_SCALE={SCALE}):\n{said}")
    finally:
        for p in procs:
            p.kill()


def communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`proc.communicate()` (its stdout and stderr, read as it writes them) within `timeout` x
    SCALE seconds; past it the process is killed and the test fails with its output."""
    try:
        return proc.communicate(timeout=timeout * SCALE)
    except subprocess.TimeoutExpired as err:
        proc.kill()
        out, err_text = proc.communicate()
        pytest.fail(f"a process still running after {err.timeout:.0f} s "
                    f"(GLAM_TEST_TIMEOUT_SCALE={SCALE}); its output:\n{_tail(out)}\n"
                    f"{_tail(err_text)}")
