"""Progress reports never disturb results, reach rank 0, and cancellation makes a failing run fail fast.

tests/core/jobs/job_progress.py: tasks calling ``self.progress(i, n)`` in a
tight loop (in a Parallel, as the root, inside a serial Sequence) give the
serial answers in-process and on 1, 2 and 3 ranks; rank 0's scheduler sees a
slow task's reports while it runs; outside a run both hooks are harmless.
A Parallel where one item raises at once while others loop ``while not
self.cancelled`` (capped at 20 s) must raise the item's error quickly: the
loops see ``cancelled`` and return, so the whole run ends well under the cap.
"""

from __future__ import annotations

import pytest
from mpijobs import IN_PROCESS, CaseCache, rank_params

PROGRESS = ["progress_parallel", "progress_root_task", "progress_in_sequence", "progress_outside_a_run",
            "progress_seen_by_rank_0", "cancel_raise_first", "after_cancel"]
jobs = {
    IN_PROCESS: CaseCache("job_progress.py", PROGRESS),
    1: CaseCache("job_progress.py", PROGRESS),
    2: CaseCache("job_progress.py", PROGRESS),
    3: CaseCache("job_progress.py", [*PROGRESS, "cancel_loop_first"]),
    4: CaseCache("job_progress.py", ["cancel_loop_first", "cancel_loops_then_raise", "after_cancel"]),
}

RANKS = rank_params(IN_PROCESS, 1, 2, 3)

#: "well under" the 20 s safety cap of the looping items
FAIL_FAST_SECONDS = 8.0


def _sum_below(n: int) -> int:
    return n * (n - 1) // 2


@pytest.mark.parametrize("ranks", RANKS)
def test_progress_does_not_change_results(ranks: int) -> None:
    run = jobs[ranks](ranks)
    assert run.ok("progress_parallel") == [_sum_below(n) for n in [2000, 3000, 50, 0, 1]]
    assert run.ok("progress_root_task") == _sum_below(5000)
    assert run.ok("progress_in_sequence") == _sum_below(_sum_below(100))
    assert run.ok("progress_outside_a_run") == {"value": _sum_below(10), "cancelled": False}


@pytest.mark.parametrize("ranks", RANKS)
def test_rank_0_sees_progress_while_a_task_runs(ranks: int) -> None:
    got = jobs[ranks](ranks).ok("progress_seen_by_rank_0")
    assert got["result"] == 40
    assert got["seen"], "rank 0 never saw a progress report during a 0.8 s task"
    assert got["totals"] == [40]
    assert 1 <= got["max_done"] <= 40
    assert got["message_ok"]
    assert got["left_over"] == 0  # a finished unit's progress is forgotten


@pytest.mark.parametrize("ranks", RANKS)
def test_cancelled_loop_lets_a_failure_end_the_run_fast(ranks: int) -> None:
    """Items ["raise", "loop"]: the failure must end the run without waiting out the loop."""
    got = jobs[ranks](ranks).ok("cancel_raise_first")
    assert got["error"] == "this item fails at once", got
    assert got["seconds"] < FAIL_FAST_SECONDS, got
    assert jobs[ranks](ranks).ok("after_cancel") == [_sum_below(10), _sum_below(20)]


@pytest.mark.parametrize("ranks", [3, 4])
def test_failure_behind_a_loop_ends_the_run_fast(ranks: int) -> None:
    """Items ["loop", "raise"] with two or more idle workers: each item gets its own worker, so the
    failure is seen at once and the loop is cancelled (it is not queued behind the loop)."""
    got = jobs[ranks](ranks).ok("cancel_loop_first")
    assert got["error"] == "this item fails at once", got
    assert got["seconds"] < FAIL_FAST_SECONDS, got


def test_several_loops_cancelled_by_one_failure() -> None:
    """Items ["loop", "loop", "raise"] on three workers: both loops see cancelled."""
    got = jobs[4](4).ok("cancel_loops_then_raise")
    assert got["error"] == "this item fails at once", got
    assert got["seconds"] < FAIL_FAST_SECONDS, got
    assert jobs[4](4).ok("after_cancel") == [_sum_below(10), _sum_below(20)]
