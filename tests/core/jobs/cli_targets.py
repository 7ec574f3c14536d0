"""TARGETs for ``pydra run`` in tests/core (test_cli_run.py, test_gang.py, test_cleanup.py).

    pydra run -n 3 tests/core/jobs/cli_targets.py:Boom a b c
"""

from __future__ import annotations

import time

import pydra


class Fails(pydra.Task):
    def work(self, item):
        if item == "bad":
            raise ZeroDivisionError(f"user boom text for {item!r}")
        return item.upper()


def boom():
    """A Parallel whose item "bad" raises on a worker."""
    return pydra.Parallel(Fails())


class Echo(pydra.Task):
    """work(*inputs): the INPUT strings as given."""

    def work(self, *inputs):
        return {"inputs": list(inputs), "count": len(inputs)}


def not_a_task():
    return 42


def broken_factory():
    raise ValueError("the factory cannot decide")


class NeedsArguments(pydra.Task):
    def __init__(self, size):
        self.size = size


instance = pydra.Sequence(Echo(), Echo())  # a Task instance as TARGET
number = 7  # neither a Task nor callable


class HalfGangFails(pydra.GangTask):
    """Gang member 1 raises while member 0 waits in a collective."""

    def work(self, *inputs):
        if self.comm.rank == 1:
            raise ValueError("gang member 1 gives up")
        return self.comm.allreduce(1)


class Sleepy(pydra.Task):
    def work(self, seconds="30", *marker):
        time.sleep(float(seconds))
        return seconds


def nap(x):
    import time

    time.sleep(0.02)
    return x


def naps():
    """150 items of 20 ms each, one per unit: about 1.5 s on two workers, long enough to show progress."""
    return pydra.Parallel(nap, range(150), chunksize=1)
