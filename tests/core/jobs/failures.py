"""Failure cases run by tests/core/test_failures.py, chosen by the first argument."""

import sys
import time

import pydra
from mpi4py import MPI


class Boom(pydra.Task):
    def work(self, x):
        if x == 3:
            raise ValueError(f"item {x} is bad")
        return x


class Patient(pydra.Task):
    """Runs until cancelled (at most 20 s); item 0 fails at once."""

    def work(self, x):
        if x == 0:
            time.sleep(0.2)
            raise RuntimeError("first item failed")
        deadline = time.monotonic() + 20
        while not self.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        return "cancelled" if self.cancelled else "ran to the end"


def main(case):
    comm = MPI.COMM_WORLD
    if case == "task-error":
        try:
            pydra.run(pydra.Parallel(Boom()), *range(6))
        except ValueError as exc:
            print("CAUGHT", type(exc).__name__, exc)
            print("CAUSE", str(exc.__cause__).strip().splitlines()[0])
        else:
            if comm.rank == 0:
                print("NOT RAISED")
    elif case == "cancel":
        started = time.monotonic()
        try:
            pydra.run(pydra.Parallel(Patient()), *range(4))
        except RuntimeError as exc:
            print("CAUGHT", exc, "after", round(time.monotonic() - started, 1))
    elif case == "worker-crash":
        # An exception outside any task on a worker rank: the whole job must abort, not hang.
        with pydra.Executor() as executor:
            if executor is not None:
                executor.submit(abs, -1).result()
        if comm.rank == comm.size - 1:
            raise SystemError("rank-local failure outside pydra")
        comm.Barrier()  # the others would wait here forever without the abort
    elif case == "idle":
        with pydra.Executor() as executor:
            started = time.process_time()
            if executor is not None:
                time.sleep(5)
            used = time.process_time() - started
        print("CPU", comm.rank, round(used, 3), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
