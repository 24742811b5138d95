"""SIGTERM and SIGINT as a clean stop: the run is marked KILLED and the process exits.

Schedulers send SIGTERM before they kill a job; a user presses Ctrl-C. Raising at once, inside
a C++ wait (an orbax save, an XLA computation), can abort the interpreter (`terminate`, exit -6)
and leave the MLflow run RUNNING. So the handlers only take note; the training loop calls
`check()` between steps and raises `Interrupted` there. A second signal of the same kind acts at
once (Python's default), for a process that does not reach a safe point.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; raised at the next safe point. `signum`: which one."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopOnSignal:
    """Context manager: while inside, SIGTERM/SIGINT are noted and `check()` raises them.
    Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM
                      else signal.default_int_handler)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if exc_type is None:
            self.check()  # a signal after the last check still stops this process

    def check(self, shared: Callable[[int], int] | None = None) -> None:
        """Raise `Interrupted` if a stop signal arrived. With `shared` (a collective every
        process calls at the same point, returning the largest of their values), every process
        raises when any of them got one."""
        signum = self.signum or 0
        if shared is not None:
            signum = shared(signum)
        if signum:
            raise Interrupted(signum)
