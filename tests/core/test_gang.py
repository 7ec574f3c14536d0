"""Gang tasks: ``self.comm`` spans exactly ``ranks`` workers and every collective works on it.

One job per rank count (tests/core/jobs/job_gang.py) runs a gang that calls
allreduce, reduce, bcast, gather, scatter, alltoall, allgather and barrier in
object form and Allreduce, Reduce, Bcast, Gather, Scatter, Alltoall in numpy
buffer form; every member's received values are compared with a serial
computation here. Also: ``ranks=2`` gives a communicator of size 2 over two
distinct workers, as the root and inside a Parallel of several items; a gang
needing more ranks than the job has fails with a clear error and the session
carries on; a failing gang reaches rank 0 with the worker's traceback header.
"""

from __future__ import annotations

from typing import Any

import pytest
from mpijobs import CaseCache, run_pydra

CASES = [
    "collectives_all_workers",
    "collectives_ranks_2",
    "gang_ranks_2_root",
    "too_many_ranks",
    "after_too_many_ranks",
    "all_members_fail",
    "gang_ranks_2_in_parallel",
    "solo_gangs_in_parallel",
]
gang_jobs = CaseCache("job_gang.py", CASES)
one_worker_jobs = CaseCache("job_gang.py", ["collectives_all_workers", "too_many_ranks", "solo_gangs_in_parallel"])


def expected_record(r: int, s: int, tag: int) -> dict[str, Any]:
    """What gang member *r* of a gang of size *s* must have received (computed serially)."""
    root = r == 0
    prod = 1
    for i in range(1, s + 1):
        prod *= i
    return {
        "rank": r,
        "size": s,
        "tag": tag,
        "allreduce": s * (s + 1) // 2,
        "reduce": prod if root else None,
        "bcast": {"k": [1, 2], "tag": tag},
        "gather": [i * i for i in range(s)] if root else None,
        "scatter": r * 10,
        "alltoall": [i * 100 + r for i in range(s)],
        "allgather": list(range(s)),
        "barrier": None,
        "Allreduce": [float(s * (s + 1) // 2)] * 4,
        "Reduce": [s] if root else None,
        "Bcast": [i * 3.5 for i in range(5)],
        "Gather": [[i, i * i] for i in range(s)] if root else None,
        "Scatter": [3 * r, 3 * r + 1, 3 * r + 2],
        "Alltoall": [r * (i + 1) for i in range(s)],
    }


def check_collectives(records: list[dict], size: int, tag: int, ranks: int) -> None:
    assert isinstance(records, list) and len(records) == size
    worlds = [record.pop("world") for record in records]
    assert len(set(worlds)) == size and all(1 <= world < ranks for world in worlds), worlds
    assert worlds == sorted(worlds)  # gang ranks follow world ranks
    for r, record in enumerate(records):
        assert record == expected_record(r, size, tag), f"gang member {r} of {size}"


@pytest.mark.parametrize("ranks", [3, 4])
def test_collectives_over_all_workers(ranks: int) -> None:
    check_collectives(gang_jobs(ranks).ok("collectives_all_workers"), ranks - 1, 7, ranks)


@pytest.mark.smoke
def test_collectives_over_the_one_worker() -> None:
    check_collectives(one_worker_jobs(2).ok("collectives_all_workers"), 1, 7, 2)


@pytest.mark.parametrize("ranks", [3, 4])
def test_collectives_with_ranks_2(ranks: int) -> None:
    check_collectives(gang_jobs(ranks).ok("collectives_ranks_2"), 2, 8, ranks)


@pytest.mark.parametrize("ranks", [3, 4])
def test_gang_ranks_2_as_root(ranks: int) -> None:
    got = gang_jobs(ranks).ok("gang_ranks_2_root")
    members = got.pop("members")
    assert got == {"x": 5, "size": 2, "sum": 10}
    assert len(set(members)) == 2 and all(1 <= m < ranks for m in members)


@pytest.mark.parametrize("ranks", [3, 4])
def test_gang_ranks_2_inside_parallel(ranks: int) -> None:
    """Five gangs of two, one per item, in input order; each over two distinct workers."""
    got = gang_jobs(ranks).ok("gang_ranks_2_in_parallel")
    assert [{k: v for k, v in g.items() if k != "members"} for g in got] == [
        {"x": x, "size": 2, "sum": 2 * x} for x in [1, 2, 3, 4, 5]
    ]
    for gang in got:
        assert len(set(gang["members"])) == 2 and all(1 <= m < ranks for m in gang["members"])


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_gangs_of_one_inside_parallel(ranks: int) -> None:
    """Several one-rank gangs start in the same scheduling pass; each gets its own result back."""
    run = gang_jobs(ranks) if ranks > 2 else one_worker_jobs(ranks)
    got = run.ok("solo_gangs_in_parallel")
    assert [{k: v for k, v in g.items() if k != "world"} for g in got] == [
        {"x": x, "size": 1, "sum": x} for x in [1, 2, 3, 4, 5, 6]
    ]
    assert all(1 <= g["world"] < ranks for g in got)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_gang_larger_than_the_job_is_a_clear_error(ranks: int) -> None:
    run = gang_jobs(ranks) if ranks > 2 else one_worker_jobs(ranks)
    error = run.error("too_many_ranks")
    assert error["type"] == "ValueError"
    assert f"needs {ranks + 1} worker ranks" in error["message"]
    assert f"has {ranks - 1}" in error["message"]


@pytest.mark.parametrize("ranks", [3, 4])
def test_session_works_after_an_oversized_gang(ranks: int) -> None:
    check_collectives(gang_jobs(ranks).ok("after_too_many_ranks"), ranks - 1, 9, ranks)


@pytest.mark.parametrize("ranks", [3, 4])
def test_failing_gang_reaches_rank_0(ranks: int) -> None:
    error = gang_jobs(ranks).error("all_members_fail")
    assert error["type"] == "RuntimeError"
    assert error["message"].startswith("gang member ") and error["message"].endswith(" gives up on x")
    header = error["cause"].strip().splitlines()[0]
    assert header.startswith("Worker ") and f" of {ranks} on " in header


def test_gang_member_failing_while_others_wait_is_reported(tmp_path) -> None:
    """One member raises while the others wait in a collective that can never complete.

    The job cannot go on, but it must end (non-zero, no hang) and the user must
    still see the failing member's exception, as for any other task failure.
    """
    finished = run_pydra(3, ["run", "tests/core/jobs/cli_targets.py:HalfGangFails"], timeout=60)
    assert finished.returncode != 0
    assert "gang member 1 gives up" in finished.stderr, finished.stderr[-2000:]
    assert "Worker " in finished.stderr and " of 3 on " in finished.stderr
