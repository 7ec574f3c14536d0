"""The job handle: one per tree walk, what Executor.submit_task, ``pydra run`` and the service use.

tests/core/jobs/job_handle.py runs each case in one process (rank 0 runs the
units itself) and on 3 ranks: the handle's future, progress and statistics
after a walk; the units it runs and on which ranks, while it runs (a gang's
unit with both members, on 3 ranks); cancel, from one thread or several at
once, stops its units and leaves the executor usable; a failing tree stops
handing out its other subtrees' units; ``shutdown(cancel_futures=True)``
cancels a tree walk at once; and the service over the handle: refusals
worded from the table of transitions, cancel and retry, per-worker job
attribution, a job's statistics, and the journal refusing a move the
table does not hold.
"""

from __future__ import annotations

import pytest
from mpijobs import IN_PROCESS, CaseCache, rank_params

CASES = ["result_progress_statistics", "units_while_running", "cancel_running", "cancel_from_threads",
         "failure_stops_the_other_units", "shutdown_cancels_tree_walks", "service_moves"]
jobs = {
    IN_PROCESS: CaseCache("job_handle.py", CASES),
    3: CaseCache("job_handle.py", [*CASES, "gang_units"]),
}
RANKS = rank_params(IN_PROCESS, 3)


def _workers(ranks: int) -> list[int]:
    return list(range(1, ranks)) if ranks > 1 else [0]


@pytest.mark.parametrize("ranks", RANKS)
def test_the_handle_gives_result_progress_and_statistics(ranks: int) -> None:
    got = jobs[ranks](ranks).ok("result_progress_statistics")
    assert got["result_ok"] and got["future_is_concurrent"] and got["done"] and got["elapsed_ok"], got
    assert got["state"] == "done" and got["progress"] == (200, 200)
    assert got["stats"] == {"state": "done", "units_done": 29, "units_failed": 0, "units_running": 0,
                            "items_done": 200, "items_failed": 0, "items_total": 200, "ranks": []}


@pytest.mark.parametrize("ranks", RANKS)
def test_the_handle_tells_which_workers_run_its_units(ranks: int) -> None:
    got = jobs[ranks](ranks).ok("units_while_running")
    assert got["ranks_seen"] == _workers(ranks) and got["one_rank_each"], got
    assert got["units_seen"] == 2 * len(_workers(ranks))
    assert got["owned"] and not got["stranger_owned"]
    assert got["units_after"] == {} and got["ranks_after"] == []


@pytest.mark.parametrize("ranks", RANKS)
def test_cancel_stops_the_units_and_the_executor_goes_on(ranks: int) -> None:
    got = jobs[ranks](ranks).ok("cancel_running")
    assert got["started"] and got["cancelled"], got
    assert got["outcome"] == got["state"] == got["stats_state"] == "cancelled"
    assert got["units_gone"] and got["frozen"] and got["far_from_done"], got
    assert got["after"] == [x * x for x in range(10)]


@pytest.mark.parametrize("ranks", RANKS)
def test_cancel_from_several_threads_at_once(ranks: int) -> None:
    assert jobs[ranks](ranks).ok("cancel_from_threads") == {"cancelled": True, "units_gone": True}


@pytest.mark.parametrize("ranks", RANKS)
def test_a_failed_tree_hands_out_no_more_of_its_units(ranks: int) -> None:
    got = jobs[ranks](ranks).ok("failure_stops_the_other_units")
    assert got["error"] == "this item fails at once", got
    assert got["state"] == got["stats_state"] == "failed" and got["units_failed"] >= 1
    assert got["units_gone"] and got["frozen"] and got["far_from_done"], got


@pytest.mark.parametrize("ranks", RANKS)
def test_shutdown_with_cancel_futures_cancels_a_tree_walk_at_once(ranks: int) -> None:
    assert jobs[ranks](ranks).ok("shutdown_cancels_tree_walks") == {"future": True, "cancelled": True, "quick": True}


def test_a_gang_unit_is_attributed_to_its_members() -> None:
    got = jobs[3](3).ok("gang_units")
    assert got == {"result": 2, "seen": [(1, 2)], "units_after": {}, "units_done": 1}


@pytest.mark.parametrize("ranks", RANKS)
def test_the_service_moves_jobs_along_the_table(ranks: int) -> None:
    got = jobs[ranks](ranks).ok("service_moves")
    assert got["attributed"] and got["slow_units_gone"] and got["quick_done"], got
    assert got["priority_running"] == "job 1 is running: only a queued job's priority can change"
    assert got["retry_running"] == "job 1 is running: only a failed or cancelled job can be retried"
    assert got["retry_queued"] == "job 2 is queued: only a failed or cancelled job can be retried"
    assert got["cancel_done"] == "job 2 is done: only a queued or running job can be cancelled"
    assert got["retry_done"] == "job 2 is done: only a failed or cancelled job can be retried"
    assert got["priority_queued"] == 3
    assert (got["cancel_queued"], got["retry_cancelled"], got["cancel_running"]) == ("cancelled", "queued", "cancelled")
    assert got["statistics"] == {"state": "cancelled", "units_running": 0}
    assert got["status"] == {"queued": 0, "running": 0, "done": 1, "failed": 0, "cancelled": 1}
    assert got["journal_refuses"] == "job 2 cannot go from done to queued: only a failed or cancelled job can"
    assert got["transitions"] == {"quick": ["queued", "cancelled", "queued", "running", "done"],
                                  "slow": ["queued", "running", "cancelled"]}
