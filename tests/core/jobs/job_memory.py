"""Rank 0's memory while it feeds a huge lazy input; see tests/core/test_memory.py.

    mpiexec -n 3 python tests/core/jobs/job_memory.py parallel|map COUNT

The items are ~100-byte strings made on the fly by a generator on rank 0;
materialising COUNT=10,000,000 of them would take ~1.5 GB. Rank 0 prints
``RESULT {json}`` with its peak RSS (KiB) before and after, the answer, and
the seconds the run took.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import core_workloads as w
from mpi4py import MPI

import pydra


def items(count: int):
    for i in range(count):
        yield w.text_item(i)


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    comm = MPI.COMM_WORLD
    comm.Barrier()
    before = peak_kib()
    started = time.monotonic()
    answer = None
    if mode == "parallel":
        results = pydra.run(pydra.Parallel(w.text_item_value, items(count)))
        if results is not None:
            answer = {"count": len(results), "sum": sum(results)}
        del results
    elif mode == "map":
        with pydra.Executor() as ex:
            if ex is not None:
                total = seen = 0
                for value in ex.map(w.text_item_value, items(count), chunksize=None):
                    total += value
                    seen += 1
                answer = {"count": seen, "sum": total}
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.monotonic() - started
    after = peak_kib()
    if comm.rank == 0:
        report = {"mode": mode, "ranks": comm.size, "before_kib": before, "after_kib": after,
                  "growth_mib": round((after - before) / 1024, 1), "seconds": round(seconds, 1), **answer}
        print("RESULT " + json.dumps(report), flush=True)


main()
