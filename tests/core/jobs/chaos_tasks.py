"""The chaos job of tests/core/test_chaos.py: 2,000 units that misbehave at random.

Every process that loads this file (each rank, each isolated child) leaves a
file ``<kind>-<pid>`` in ``CHAOS_DIR`` so the test harness can find victims:
kind is ``master`` (rank 0), ``worker`` (another rank) or ``child`` (an
isolated worker's child process, which has no MPI rank). A call decides what
to do from ``CHAOS_SEED``, its item and how often this process has been
called, so a run is reproducible from its seed up to the harness's timing.
"""

import ctypes
import os
import random
import time

import pydra

ITEMS = 2000
SEED = int(os.environ.get("CHAOS_SEED", "0"))
#: "raise", "hang" and, with isolation, "crash" (a segfault)
MISCHIEF = os.environ.get("CHAOS_MISCHIEF", "raise,hang").split(",")


def _announce() -> None:
    directory = os.environ.get("CHAOS_DIR")
    if not directory:
        return
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
    kind = "child" if rank is None else ("master" if rank == "0" else "worker")
    open(os.path.join(directory, f"{kind}-{os.getpid()}"), "w").close()


_announce()


class Chaotic(pydra.Task):
    """x -> x * x + 1, after a few milliseconds of work; now and then it raises, hangs or crashes."""

    retries = 10
    retry_delay = 0.01
    timeout = 1.5
    calls = 0

    def work(self, x: int) -> int:
        Chaotic.calls += 1
        luck = random.Random(hash((SEED, x, os.getpid(), Chaotic.calls))).random()
        if "raise" in MISCHIEF and luck < 0.02:
            raise RuntimeError(f"chaos: item {x} raised")
        if "hang" in MISCHIEF and 0.02 <= luck < 0.025:
            time.sleep(60)
        if "crash" in MISCHIEF and 0.025 <= luck < 0.03:
            ctypes.string_at(0)
        time.sleep(0.004)
        return x * x + 1


def job() -> pydra.Task:
    return pydra.Parallel(Chaotic(), range(ITEMS))
