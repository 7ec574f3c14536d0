"""The harness of the core job scripts: run named cases collectively, report each on rank 0.

A job script maps case names to zero-argument functions that every rank
calls (each typically one collective ``pydra.run``). ``main(CASES)`` runs the
cases named on the command line in order and rank 0 prints, per case::

    START name
    CASE name <repr of the result>          (or)
    ERROR name <repr of a dict describing the exception rank 0 got>

A watchdog on rank 0 prints ``HUNG name`` and aborts the whole MPI job when
a case overruns its deadline, so one hang costs seconds, not the test's
timeout, and the test harness (tests/core/mpijobs.py) reruns the remaining
cases in a fresh job.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

COMM = MPI.COMM_WORLD


def say(text: str) -> None:
    """Print one line from rank 0, at once (the job may be aborted right after)."""
    if COMM.rank == 0:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def describe(exc: BaseException) -> dict[str, Any]:
    """What a test wants to know about an exception rank 0 got from Pydra."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "cause_type": type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
        "cause": str(exc.__cause__) if exc.__cause__ is not None else "",
        "notes": list(getattr(exc, "__notes__", [])),
    }


class Watchdog:
    """Abort the MPI job if a case runs longer than *seconds* (armed on rank 0 only)."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds
        self.timer: threading.Timer | None = None

    def __enter__(self) -> Watchdog:
        if COMM.rank == 0:
            self.timer = threading.Timer(self.seconds, self._fire)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _fire(self) -> None:
        os.write(1, f"HUNG {self.name}\n".encode())
        os.write(2, f"core_jobkit: case {self.name} overran {self.seconds} s; aborting the job\n".encode())
        COMM.Abort(70)


def main(cases: dict[str, Callable[[], Any]], deadline: float = 10.0) -> None:
    """Run the cases named in sys.argv[1:] (all of them if none), in that order."""
    names = sys.argv[1:] or list(cases)
    for name in names:
        function = cases[name]
        say(f"START {name}")
        started = time.monotonic()
        with Watchdog(name, deadline):
            try:
                value = function()
            except Exception as exc:  # rank 0 reports it; the next case still runs
                if COMM.rank == 0:
                    say(f"ERROR {name} {describe(exc)!r}")
                    sys.stderr.write(f"case {name}:\n{traceback.format_exc()}\n")
                continue
        if COMM.rank == 0:
            say(f"CASE {name} {value!r}")
            say(f"TIME {name} {time.monotonic() - started:.3f}")
    COMM.Barrier()
