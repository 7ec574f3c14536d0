"""An Executor entered without ``with`` and never shut down; see tests/core/test_executor_parity.py.

    mpiexec -n 3 python tests/core/jobs/job_no_with.py OUTFILE

Every rank enters the executor by hand. Rank 0 submits calls that append a
line to OUTFILE each and ends its script without waiting: as with
``concurrent.futures``, the calls must all run before the interpreter exits,
and the workers must be let go rather than lost.
"""

from __future__ import annotations

import sys
import time

import pydra


def append_line(path: str, number: int) -> None:
    time.sleep(0.05)
    with open(path, "a") as out:
        out.write(f"call {number}\n")


executor = pydra.Executor().__enter__()
if executor is not None:
    for number in range(10):
        executor.submit(append_line, sys.argv[1], number)
    print("RANK0 SUBMITTED", flush=True)
else:
    print("WORKER RELEASED", flush=True)
