"""Progress reports and cooperative cancellation; see tests/core/test_progress.py.

    mpiexec -n 3 python tests/core/jobs/job_progress.py [CASE...]
"""

from __future__ import annotations

import time

import core_jobkit
from mpi4py import MPI

import pydra

#: a looping task gives up after this long even if never cancelled
SAFETY_CAP = 20.0


class Counting(pydra.Task):
    """Reports progress at every step of a tight loop."""

    def work(self, n):
        total = 0
        for i in range(n):
            total += i
            self.progress(i + 1, n, f"step {i + 1} of {n}")
        return total


class SlowProgress(pydra.Task):
    def work(self, n):
        for i in range(n):
            time.sleep(0.02)
            self.progress(i + 1, n, f"step {i + 1}")
        return n


class LoopUntilCancelled(pydra.Task):
    """Item "raise" fails at once; item "loop" polls self.cancelled (capped at SAFETY_CAP)."""

    def work(self, item):
        if item == "raise":
            raise ValueError("this item fails at once")
        started = time.monotonic()
        while not self.cancelled:
            if time.monotonic() - started > SAFETY_CAP:
                return "never cancelled"
            time.sleep(0.01)
        return "cancelled"


def progress_outside_a_run():
    """Calling work() directly (no Pydra unit around it): progress is a no-op, cancelled is False."""
    task = Counting()
    return {"value": task.work(10), "cancelled": task.cancelled}


def progress_seen_by_rank_0():
    with pydra.Executor() as ex:
        if ex is None:
            return None
        future = ex.submit_task(SlowProgress(), 40)
        seen = []
        while not future.done():
            for _uid, (rank, done, total, message) in list(ex.master.progress.items()):
                seen.append((done, total, message))
            time.sleep(0.01)
        return {"result": future.result(), "seen": len(seen) > 0, "totals": sorted({t for _, t, _ in seen}),
                "max_done": max((d for d, _, _ in seen), default=None),
                "message_ok": all(m == f"step {d}" for d, _, m in seen),
                "left_over": len(ex.master.progress)}


def fail_fast(items):
    """Run Parallel(LoopUntilCancelled) over *items*; rank 0 reports the error and how long it took."""
    started = time.monotonic()
    try:
        value = pydra.run(pydra.Parallel(LoopUntilCancelled(), items))
    except ValueError as exc:
        return {"error": str(exc), "seconds": round(time.monotonic() - started, 2)}
    if MPI.COMM_WORLD.rank == 0:
        return {"error": None, "value": value, "seconds": round(time.monotonic() - started, 2)}
    return None


CASES = {
    "progress_parallel": lambda: pydra.run(pydra.Parallel(Counting(), [2000, 3000, 50, 0, 1])),
    "progress_root_task": lambda: pydra.run(Counting(), 5000),
    "progress_in_sequence": lambda: pydra.run(pydra.Sequence(Counting(), Counting()), 100),
    "progress_outside_a_run": progress_outside_a_run,
    "progress_seen_by_rank_0": progress_seen_by_rank_0,
    "cancel_raise_first": lambda: fail_fast(["raise", "loop"]),
    "cancel_loop_first": lambda: fail_fast(["loop", "raise"]),
    "cancel_loops_then_raise": lambda: fail_fast(["loop", "loop", "raise"]),
    "after_cancel": lambda: pydra.run(pydra.Parallel(Counting(), [10, 20])),
}

if __name__ == "__main__":
    core_jobkit.main(CASES, deadline=SAFETY_CAP + 15)
