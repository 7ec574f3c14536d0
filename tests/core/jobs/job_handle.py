"""The job handle of a tree walk, and the service over it; see tests/core/test_jobs.py.

    python tests/core/jobs/job_handle.py [CASE...]            (one process: rank 0 runs the units)
    mpiexec -n 3 python tests/core/jobs/job_handle.py [CASE...]
"""

from __future__ import annotations

import concurrent.futures
import shutil
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import core_jobkit
from mpi4py import MPI

import pydra
from pydra._core.evaluate import Walk

#: a case polls this long at most for something it waits for
PATIENCE = 10.0


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def square(x: int) -> int:
    return x * x


def nap_or_fail(item: Any) -> Any:
    if item == "fail":
        raise ValueError("this item fails at once")
    time.sleep(item)
    return item


class Hold(pydra.GangTask):
    """Two ranks hold on for a while, then count themselves."""

    ranks = 2

    def work(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.comm.allreduce(1)


def wait_for(predicate: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    """Poll *predicate* until it holds (True) or *timeout* seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def workers() -> list[int]:
    size = MPI.COMM_WORLD.size
    return list(range(1, size)) if size > 1 else [0]


def session(body: Callable[[pydra.Executor], Any]) -> Callable[[], Any]:
    """A case: *body(executor)* on rank 0 of a fresh session; the other ranks serve."""

    def case() -> Any:
        with pydra.Executor() as ex:
            if ex is None:
                return None
            return body(ex)

    return case


# -- the handle -----------------------------------------------------------------------------------


def result_progress_statistics(ex: pydra.Executor) -> dict:
    job = Walk.start(ex.master, pydra.Parallel(square, chunksize=7), range(200))
    result = job.result(30)
    stats = job.statistics()
    return {
        "result_ok": result == [x * x for x in range(200)],
        "future_is_concurrent": isinstance(job.future, concurrent.futures.Future),
        "done": job.done(),
        "state": job.state.value,
        "progress": job.progress(),
        "stats": {key: stats[key] for key in ("state", "units_done", "units_failed", "units_running",
                                              "items_done", "items_failed", "items_total", "ranks")},
        "elapsed_ok": 0 < stats["elapsed"] < 30,
    }


def units_while_running(ex: pydra.Executor) -> dict:
    count = 2 * len(workers())
    job = Walk.start(ex.master, pydra.Parallel(nap, chunksize=1), [0.4] * count)
    seen: dict[int, tuple] = {}
    owned = True
    while not job.done():
        units = job.units()
        seen.update(units)
        owned = owned and all(job.owns(uid) for uid in units)
        time.sleep(0.01)
    job.result()
    return {
        "ranks_seen": sorted({rank for ranks in seen.values() for rank in ranks}),
        "one_rank_each": all(len(ranks) == 1 for ranks in seen.values()),
        "units_seen": len(seen),
        "owned": owned,
        "stranger_owned": job.owns(10**9),
        "units_after": job.units(),
        "ranks_after": job.ranks(),
    }


def cancel_running(ex: pydra.Executor) -> dict:
    job = Walk.start(ex.master, pydra.Parallel(nap, chunksize=1), [0.05] * 2000)
    started = wait_for(lambda: job.progress()[0] >= 2)
    cancelled = job.cancel()
    units_gone = wait_for(lambda: not job.units(), 5)
    at_stop = job.progress()[0]
    time.sleep(0.5)  # replies of the units cancelled would show here
    later = job.progress()[0]
    try:
        job.result(5)
        outcome = "result"
    except concurrent.futures.CancelledError:
        outcome = "cancelled"
    after = ex.submit_task(pydra.Parallel(square), *range(10)).result(30)
    return {
        "started": started, "cancelled": cancelled, "outcome": outcome, "state": job.state.value,
        "stats_state": job.statistics()["state"], "units_gone": units_gone, "frozen": later == at_stop,
        "far_from_done": later < 1000, "again": job.cancel(), "after": after,
    }


def cancel_from_threads(ex: pydra.Executor) -> dict:
    job = Walk.start(ex.master, pydra.Parallel(nap, chunksize=1), [0.05] * 2000)
    wait_for(lambda: job.progress()[0] >= 1)
    threads = [threading.Thread(target=job.cancel) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"cancelled": job.future.cancelled(), "units_gone": wait_for(lambda: not job.units(), 5)}


def failure_stops_the_other_units(ex: pydra.Executor) -> dict:
    # A Parallel over subtrees: each list is a stream of its own. The first fails at once (the
    # scheduler serves the streams in the order they started): the other two are not wanted.
    tree = pydra.Parallel(pydra.Parallel(nap_or_fail, chunksize=1))
    job = Walk.start(ex.master, tree, [["fail"], [0.1] * 100, [0.1] * 100])
    try:
        job.result(30)
        error = None
    except ValueError as exc:
        error = str(exc).splitlines()[0]
    units_gone = wait_for(lambda: not job.units(), 5)
    at_stop = job.progress()[0]
    time.sleep(0.5)
    stats = job.statistics()
    return {
        "error": error, "state": job.state.value, "units_gone": units_gone,
        "frozen": job.progress()[0] == at_stop, "far_from_done": at_stop < 150,
        "units_failed": stats["units_failed"], "stats_state": stats["state"],
    }


def gang_units(ex: pydra.Executor) -> dict:
    job = Walk.start(ex.master, Hold(), (0.8,))
    seen: dict[int, tuple] = {}
    while not job.done():
        seen.update(job.units())
        time.sleep(0.01)
    return {"result": job.result(), "seen": sorted(seen.values()), "units_after": job.units(),
            "units_done": job.statistics()["units_done"]}


def shutdown_cancels_tree_walks() -> dict | None:
    with pydra.Executor() as ex:
        if ex is None:
            return None
        future = ex.submit_task(pydra.Parallel(nap, chunksize=1), *([0.1] * 1000))
        time.sleep(0.3)  # a few units run
        began = time.monotonic()
        ex.shutdown(wait=True, cancel_futures=True)
        return {"future": isinstance(future, concurrent.futures.Future), "cancelled": future.cancelled(),
                "quick": time.monotonic() - began < 5}


# -- the service over the handle ------------------------------------------------------------------

TARGETS = '''
import time
import pydra

def nap(x):
    time.sleep(float(x))
    return 1

def naps():
    return pydra.Parallel(nap, chunksize=1)

def square(x):
    return int(x) ** 2

def squares():
    return pydra.Parallel(square)
'''


def service_moves(ex: pydra.Executor) -> dict:
    from pydra.jobstates import JobStateError
    from pydra.journal import Journal
    from pydra.service import Service, ServiceError

    run_dir = Path(tempfile.mkdtemp(prefix="pydra-service-"))
    (run_dir / "targets.py").write_text(textwrap.dedent(TARGETS))
    journal = Journal.open(run_dir, create=True)
    service = Service(ex.master, journal, run_dir, "test", max_jobs=1)
    got: dict[str, Any] = {}

    def refusal(call: Callable[[], Any]) -> str | None:
        try:
            call()
        except (ServiceError, JobStateError) as exc:
            return str(exc)
        return None

    slow = service.submit(f"{run_dir}/targets.py:naps", ["0.05"] * 400)["id"]
    quick = service.submit(f"{run_dir}/targets.py:squares", ["3", "4"])["id"]
    got["attributed"] = wait_for(lambda: any(slow in row["jobs"] for row in service.workers()))
    got["priority_running"] = refusal(lambda: service.set_priority(slow, 5))
    got["retry_running"] = refusal(lambda: service.retry(slow))
    got["retry_queued"] = refusal(lambda: service.retry(quick))
    got["priority_queued"] = service.set_priority(quick, 3)["priority"]
    got["cancel_queued"] = service.cancel(quick)["state"]
    got["retry_cancelled"] = service.retry(quick)["state"]
    got["cancel_running"] = service.cancel(slow)["state"]
    got["slow_units_gone"] = wait_for(lambda: not any(slow in row["jobs"] for row in service.workers()))
    got["quick_done"] = wait_for(lambda: service.job(quick)["state"] == "done")
    got["cancel_done"] = refusal(lambda: service.cancel(quick))
    got["retry_done"] = refusal(lambda: service.retry(quick))
    statistics = service.job(slow)["statistics"]
    got["statistics"] = {key: statistics[key] for key in ("state", "units_running")}
    got["status"] = {key: service.status()[key] for key in ("queued", "running", "done", "failed", "cancelled")}
    got["journal_refuses"] = refusal(lambda: journal.set_state(quick, "queued"))
    got["transitions"] = {
        "quick": [state for state, _ in journal.transitions(quick)],
        "slow": [state for state, _ in journal.transitions(slow)],
    }
    service.shutdown(now=True)
    service.wait()
    journal.close()
    shutil.rmtree(run_dir)
    return got


CASES = {
    "result_progress_statistics": session(result_progress_statistics),
    "units_while_running": session(units_while_running),
    "cancel_running": session(cancel_running),
    "cancel_from_threads": session(cancel_from_threads),
    "failure_stops_the_other_units": session(failure_stops_the_other_units),
    "shutdown_cancels_tree_walks": shutdown_cancels_tree_walks,
    "service_moves": session(service_moves),
    "gang_units": session(gang_units),
}

if __name__ == "__main__":
    core_jobkit.main(CASES, deadline=45)
