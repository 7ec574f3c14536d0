"""Targets for tests/shell/test_cluster.py: jobs submitted to a service cluster with ``pydra shell``.

``FAULT_DIR`` (an environment variable the test gives the cluster) names a
directory where a task marks what it has tried (``testkit.first_try``), so
"fail on the first try only" holds across ranks, executor processes and job
retries.
"""

import threading
import time

import pydra
from testkit import first_try




def square(x: str) -> int:
    return int(x) ** 2


class Nap(pydra.Task):
    """Sleep *x* seconds (a float), or until cancelled; then say 1."""

    def work(self, x: str) -> int:
        deadline = time.monotonic() + float(x)
        while time.monotonic() < deadline and not self.cancelled:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return 1


class Spin(pydra.Task):
    """*x* is "SECONDS,THREADS": keep a core busy that long (or until cancelled), THREADS idle threads beside it."""

    def work(self, x: str) -> int:
        seconds, threads = x.split(",")
        release = threading.Event()
        pool = [threading.Thread(target=release.wait) for _ in range(int(threads))]
        for thread in pool:
            thread.start()
        try:
            deadline = time.monotonic() + float(seconds)
            while time.monotonic() < deadline and not self.cancelled:
                sum(range(10_000))
        finally:
            release.set()
            for thread in pool:
                thread.join()
        return 1


class FailsFirstTime(pydra.Task):
    """Raises on the first run of the job whose input tag is *x*, succeeds afterwards (no in-job retry)."""

    retries = 0

    def work(self, x: str) -> str:
        if first_try("fails", x):
            raise ValueError(f"first try of {x} fails on purpose")
        return f"{x} worked"


def squares() -> pydra.Task:
    """The squares of the inputs (quick)."""
    return pydra.Parallel(square)


def naps() -> pydra.Task:
    """One nap per input, one item per unit: several seconds of wall time over three workers."""
    return pydra.Parallel(Nap(), chunksize=1)


def spins() -> pydra.Task:
    """One spin per input."""
    return Spin()


def fails_first_time() -> pydra.Task:
    return FailsFirstTime()
