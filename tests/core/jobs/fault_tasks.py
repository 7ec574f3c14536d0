"""Targets for tests/core/test_faults.py: tasks that fail, hang or crash on purpose.

``FAULT_DIR`` (an environment variable) names a directory where a task marks
each item it has tried (``testkit.first_try``), so "fail on the first try
only" holds across ranks and processes.
"""

import ctypes
import os
import signal
import time

import pydra
from testkit import first_try




def square(x: str) -> int:
    return int(x) ** 2


class RaisesOnce(pydra.Task):
    """Every third item raises on its first try."""

    retries = 2
    retry_delay = 0.01

    def work(self, x: str) -> int:
        if int(x) % 3 == 0 and first_try("raise", x):
            raise ValueError(f"first try of {x}")
        return square(x)


class AlwaysBadSevens(pydra.Task):
    """Items ending in 7 always raise."""

    def work(self, x: str) -> int:
        if x.endswith("7"):
            raise ValueError(f"{x} is unlucky")
        return square(x)


class HangsOnce(pydra.Task):
    """Item 5 hangs on its first try (sleeps far past the timeout)."""

    timeout = 1.0
    retries = 1
    retry_delay = 0.01

    def work(self, x: str) -> int:
        if x == "5" and first_try("hang", x):
            time.sleep(60)
        return square(x)


class CrashesOnce(pydra.Task):
    """Item 4 segfaults on its first try, item 6 calls os._exit."""

    retries = 1
    retry_delay = 0.01

    def work(self, x: str) -> int:
        if x == "4" and first_try("segv", x):
            ctypes.string_at(0)
        if x == "6" and first_try("exit", x):
            os._exit(3)
        return square(x)


class ExitsOnce(pydra.Task):
    """Item 6 ends its worker rank with ``os._exit(9)`` on its first try (not isolated: the rank is lost)."""

    def work(self, x: str) -> int:
        if x == "6" and first_try("exit", x):
            os._exit(9)
        return square(x)


class ExitsAlways(pydra.Task):
    """Item 3 ends whatever process runs it with ``os._exit(EXIT_STATUS)``, on every try."""

    def work(self, x: str) -> int:
        if x == "3":
            os._exit(int(os.environ["EXIT_STATUS"]))
        return square(x)


class SlowOnce(pydra.Task):
    """No retries; each item takes 0.2 s. Run isolated, item 0 notes its rank's pid (``rank-PID``: its parent's)."""

    retries = 0

    def work(self, x: str) -> int:
        if x == "0":
            open(os.path.join(os.environ["FAULT_DIR"], f"rank-{os.getppid()}"), "w").close()
        time.sleep(0.2)
        return square(x)


class WordsOnce(pydra.MapReduce):
    """Counts characters; the map of item "c" raises on its first try after emitting some pairs."""

    retries = 1
    retry_delay = 0.01

    def map(self, item: str):
        for position, char in enumerate(item):
            if item.startswith("c") and position == 2 and first_try("map", item):
                raise ValueError("half-way through the map")
            yield char, 1

    def reduce(self, key: str, values: list) -> int:
        return sum(values)


def raises_once() -> pydra.Task:
    return pydra.Parallel(RaisesOnce())


def raises_once_no_retry() -> pydra.Task:
    return pydra.Parallel(RaisesOnce(), retries=0)


def bad_sevens_allowed() -> pydra.Task:
    return pydra.Parallel(AlwaysBadSevens(), allow_failures=3)


def bad_sevens_too_many() -> pydra.Task:
    return pydra.Parallel(AlwaysBadSevens(), allow_failures=1)


def hangs_once() -> pydra.Task:
    return pydra.Parallel(HangsOnce(), chunksize=1)


def hangs_no_retry() -> pydra.Task:
    return pydra.Parallel(HangsOnce(), chunksize=1, retries=0)


def crashes_once() -> pydra.Task:
    return pydra.Parallel(CrashesOnce(), chunksize=1)


def crashes_no_retry() -> pydra.Task:
    return pydra.Parallel(CrashesOnce(), chunksize=1, retries=0)


def exits_once() -> pydra.Task:
    return pydra.Parallel(ExitsOnce(), chunksize=1)


def exits_always() -> pydra.Task:
    return pydra.Parallel(ExitsAlways(), chunksize=1)


def slow_no_retry() -> pydra.Task:
    return pydra.Parallel(SlowOnce(), chunksize=1)


def words_once() -> pydra.Task:
    return WordsOnce()


def big(x: str) -> str:
    """A result of about 10 kB."""
    return x * 10_000


def big_results() -> pydra.Task:
    return pydra.Parallel(big, chunksize=1)


class MapKillsItsRank(pydra.MapReduce):
    """Counts characters; the rank that maps "kill" first SIGKILLs itself (pairs it held are lost)."""

    def map(self, item: str):
        if item == "kill" and first_try("kill", item):
            os.kill(os.getpid(), signal.SIGKILL)
        for char in item:
            yield char, 1

    def reduce(self, key: str, values: list) -> int:
        return sum(values)


class GangLosesAMember(pydra.GangTask):
    """Sums x over the gang (every worker); gang rank 1 SIGKILLs itself on the first run."""

    def work(self, x: str) -> dict:
        if self.comm.rank == 1 and first_try("gang", x):
            os.kill(os.getpid(), signal.SIGKILL)
        return {"sum": self.comm.allreduce(int(x)), "size": self.comm.size}


def map_kills_its_rank() -> pydra.Task:
    return MapKillsItsRank()


def gang_loses_a_member() -> pydra.Task:
    return GangLosesAMember()
