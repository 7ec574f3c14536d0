"""Task trees give the serial answer on any number of ranks.

Every container (Parallel, Sequence, MapReduce, GangTask) and the nestings
users write (Parallel of Sequence holding a Parallel, Sequence of Parallel
then serial, Parallel of Parallel, MapReduce and GangTask inside Parallel),
built from Task subclasses and from plain functions, run in ONE mpiexec job
per rank count (tests/core/jobs/job_tasks.py) and in-process without
mpiexec; each case's result must equal the same computation done serially
here. Also: empty inputs, a fixed chunksize, the root input conventions, and
a worker's exception reaching rank 0 with its "Worker r of n on host" header
without breaking the runs after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from mpijobs import IN_PROCESS, CaseCache, workers_of, rank_params
from mpijobs import workloads as w


def _letter_counts(words: list[str]) -> dict[str, int]:
    return dict(Counter(letter for word in words for letter in word))


def _gang(x: int, ranks: int) -> dict[str, Any]:
    size = workers_of(ranks)
    return {"x": x, "size": size, "sum": x * size * (size + 1) // 2}


def _blob_digest(mib: int) -> list:
    """What job_tasks.digest says about job_tasks.blob(mib): length, first and last byte."""
    byte = f"{mib % 251:02x}"
    return [mib << 20, byte, byte]


def _split_sessions(ranks: int) -> list[tuple]:
    """Sessions on the even and odd halves of COMM_WORLD: (color, size, squares of 10 or 20)."""
    size = max(1, ranks)
    if size == 1:
        return [(0, 1, [w.square(x) for x in range(10)])]
    return [(0, (size + 1) // 2, [w.square(x) for x in range(10)]), (1, size // 2, [w.square(x) for x in range(20)])]


#: case name -> the serial answer, as a function of the number of ranks
EXPECTED: dict[str, Callable[[int], Any]] = {
    "task_root": lambda r: w.add_mul(6, 7),
    "task_class_root": lambda r: [w.square(x) for x in w.ITEMS],
    "function_parallel": lambda r: [w.square(x) for x in w.ITEMS],
    "task_parallel": lambda r: [w.square(x) for x in w.ITEMS],
    "parallel_root_inputs": lambda r: [w.square(x) for x in w.ITEMS],
    "parallel_generator": lambda r: [w.square(x) for x in w.ITEMS],
    "parallel_chunksize": lambda r: [w.square(x) for x in range(100)],
    "parallel_chunksize_1": lambda r: [w.square(x) for x in w.ITEMS],
    "parallel_large": lambda r: [w.inc(x) for x in range(20000)],
    "task_state": lambda r: [3 * x for x in w.ITEMS],
    "sequence_serial_root": lambda r: w.double(w.total(w.numbers(10))),
    "sequence_parallel_first": lambda r: w.total(w.square(x) for x in w.ITEMS),
    "parallel_of_sequence_with_parallel": lambda r: [w.sum_of_squares(n) for n in w.PIPE_INPUTS],
    "sequence_of_parallel_then_serial": lambda r: w.double(w.total(w.sum_of_squares(n) for n in w.PIPE_INPUTS)),
    "parallel_of_parallel": lambda r: [[w.square(x) for x in inner] for inner in w.NESTED],
    "parallel_of_serial_sequence": lambda r: [w.double(w.inc(x)) for x in w.ITEMS],
    "nested_sequences": lambda r: w.inc(w.total(w.square(x) for x in w.numbers(6))),
    "mapreduce_root": lambda r: _letter_counts(w.WORDS),
    "mapreduce_in_sequence": lambda r: {k: [n for n in w.numbers(40) if n % 7 == k] for k in range(7)},
    "mapreduce_in_parallel": lambda r: [dict(Counter(group)) for group in w.GROUPS],
    "gang_root": lambda r: _gang(5, r),
    "gang_in_sequence": lambda r: w.total(w.numbers(100)),
    "gang_in_parallel": lambda r: [_gang(x, r) for x in (1, 2, 3)],
    "empty_parallel": lambda r: [],
    "empty_parallel_generator": lambda r: [],
    "empty_parallel_of_parallel": lambda r: [],
    "empty_mapreduce": lambda r: {},
    "empty_root_parallel": lambda r: [],
    "empty_root_mapreduce": lambda r: {},
    "after_failure": lambda r: [w.square(x) for x in w.ITEMS],
    "large_results": lambda r: [_blob_digest(n) for n in (9, 17, 3, 12)],
    "large_items": lambda r: [_blob_digest(n) for n in (11, 2, 15)],
    "split_comm": lambda r: _split_sessions(r),
}

CASES = [*EXPECTED, "failure_in_parallel"]
# run "after_failure" right after the failure: a failed run must not break the next one
CASES.remove("after_failure")
CASES.append("after_failure")

tree_jobs = CaseCache("job_tasks.py", CASES)

RANKS = rank_params(IN_PROCESS, 1, 2, 3, 4)


def _strip_gang_members(value: Any) -> Any:
    """Gang results name their world ranks, which vary: check them apart."""
    if isinstance(value, dict) and "members" in value:
        return {k: v for k, v in value.items() if k != "members"}
    if isinstance(value, list):
        return [_strip_gang_members(v) for v in value]
    return value


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_tree_equals_serial(case: str, ranks: int) -> None:
    got = tree_jobs(ranks).ok(case)
    assert _strip_gang_members(got) == EXPECTED[case](ranks), f"{case} on {ranks or 'in-process'} ranks"


@pytest.mark.parametrize("ranks", RANKS)
def test_gang_members_are_workers(ranks: int) -> None:
    """A gang of ranks=None holds every worker once, and never rank 0 when there are workers."""
    got = tree_jobs(ranks).ok("gang_root")
    expected = list(range(1, ranks)) if ranks > 1 else [0]
    assert sorted(got["members"]) == expected
    assert got["members"][0] == min(got["members"])  # gang rank order follows world rank order


@pytest.mark.parametrize("ranks", RANKS)
def test_worker_exception_reaches_rank_0(ranks: int) -> None:
    error = tree_jobs(ranks).error("failure_in_parallel")
    assert error["type"] == "ValueError"
    assert error["message"] == "item 13 is bad"
    assert error["cause_type"] == "RemoteTraceback"
    size = max(1, ranks)
    header = error["cause"].strip().splitlines()[0]
    assert header.startswith("Worker ") and f" of {size} on " in header, header
    worker = int(header.split()[1])
    assert (worker == 0) if ranks <= 1 else (1 <= worker < ranks), header
    assert "item 13 is bad" in error["cause"] and "Traceback" in error["cause"]
