"""TARGET for tests/core/test_startup_imports.py: which heavy modules a rank has loaded.

Each item runs on a worker and returns the modules of :data:`HEAVY` loaded
there at that moment (with ``Shuffled``, after a MapReduce's shuffle); rank 0 prints its own at exit, on stderr.
Run as a script under mpiexec, every rank calls ``pydra.run(Loaded(), ...)`` (a
user's script does so) and rank 0 prints ``RESULT`` and the workers' lists.
"""

import atexit
import json
import os
import sys

import pydra

#: modules a plain `pydra run` has no use for on a worker (rank 0 needs asyncio and sqlite3)
HEAVY = ("numpy", "cryptography", "prompt_toolkit", "sqlite3", "asyncio", "pydra._core.master",
         "pydra._core.scheduler", "pydra.journal", "pydra.executor", "pydra._core.isolation", "pydra._core.evaluate",
         "importlib.abc", "tempfile", "secrets")


def loaded(_item: str) -> list[str]:
    return [name for name in HEAVY if name in sys.modules]


def Loaded():
    return pydra.Parallel(loaded)


class Shuffled(pydra.MapReduce):
    """A MapReduce whose every key reduces to what its worker has loaded once the shuffle is done."""

    def map(self, item):
        yield item, 1

    def combine(self, key, counts):
        return sum(counts)

    def reduce(self, key, counts):
        return loaded(key)


if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "0":  # MPICH's launcher, Open MPI's
    atexit.register(lambda: print(f"rank 0 loaded: {loaded('')}", file=sys.stderr))


if __name__ == "__main__":
    result = pydra.run(Loaded(), "a", "b", "c", "d")
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)
