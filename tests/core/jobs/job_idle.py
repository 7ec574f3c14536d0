"""An idle session must not busy-wait; see tests/core/test_idle.py.

    mpiexec -n 4 python tests/core/jobs/job_idle.py SECONDS

Every rank enters ``with pydra.Executor()``; rank 0 runs one call, then
sleeps SECONDS with nothing to do. Each rank measures the CPU time its whole
process used (all threads: time.process_time) across the session; rank 0
gathers them and prints ``RESULT [{rank, cpu, wall}, ...]``.
"""

from __future__ import annotations

import json
import sys
import time

from mpi4py import MPI

import pydra


def main() -> None:
    idle = float(sys.argv[1])
    comm = MPI.COMM_WORLD
    comm.Barrier()
    cpu0, wall0 = time.process_time(), time.monotonic()
    idle_cpu = None
    with pydra.Executor() as ex:
        if ex is not None:
            assert ex.submit(abs, -5).result(timeout=30) == 5
            mark = time.process_time()
            time.sleep(idle)
            idle_cpu = time.process_time() - mark
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    report = {"rank": comm.rank, "cpu": round(cpu, 4), "wall": round(wall, 3)}
    if idle_cpu is not None:
        report["idle_cpu"] = round(idle_cpu, 4)
    reports = comm.gather(report, root=0)
    if comm.rank == 0:
        print("RESULT " + json.dumps(reports), flush=True)


main()
