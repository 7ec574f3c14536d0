"""Targets for tests/shell/test_cluster.py: jobs submitted to a service cluster with ``pydra shell``.

``SERVICE_DIR`` (an environment variable the test gives the cluster) names a
directory where a task marks what it has tried, so "fail on the first try
only" holds across ranks, executor processes and job retries.
"""

import os
import time

import pydra


def first_try(tag: str) -> bool:
    """True exactly once per *tag* across the whole cluster's life."""
    path = os.path.join(os.environ["SERVICE_DIR"], f"tried-{tag}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def square(x: str) -> int:
    return int(x) ** 2


def nap(x: str) -> int:
    """Sleep *x* seconds (a float), then say how many."""
    time.sleep(float(x))
    return 1


class FailsFirstTime(pydra.Task):
    """Raises on the first run of the job whose input tag is *x*, succeeds afterwards (no in-job retry)."""

    retries = 0

    def work(self, x: str) -> str:
        if first_try(f"fails-{x}"):
            raise ValueError(f"first try of {x} fails on purpose")
        return f"{x} worked"


def squares() -> pydra.Task:
    """The squares of the inputs (quick)."""
    return pydra.Parallel(square)


def naps() -> pydra.Task:
    """One nap per input, one item per unit: several seconds of wall time over three workers."""
    return pydra.Parallel(nap, chunksize=1)


def fails_first_time() -> pydra.Task:
    return FailsFirstTime()
