"""Rank 0 never materialises a lazy input: 10 million items stream through in bounded memory.

A generator of 10,000,000 ~100-byte strings (about 1.5 GB if held at once)
feeds a Parallel, and then Executor.map(chunksize=None) read lazily, on 3
ranks (tests/core/jobs/job_memory.py). Rank 0 measures its own peak RSS
(``ru_maxrss``) before and after: the growth must stay far below the cost of
materialising the items (< 400 MB for Parallel, whose 10M-entry result list
alone is 80 MB; < 100 MB for the lazily consumed map), and the sum of the
results must be right. The measured numbers and times are printed (-s).
"""

from __future__ import annotations

import pytest
from mpijobs import result_line, run_script
from mpijobs import workloads as w

COUNT = 10_000_000
TIMEOUT = 300

pytestmark = pytest.mark.slow


def _run(mode: str) -> dict:
    finished = run_script(3, "job_memory.py", [mode, str(COUNT)], timeout=TIMEOUT)
    report = result_line(finished)
    print(f"\nmemory {mode}: {report}")
    assert finished.returncode == 0, finished.stderr[-2000:]
    return report


def test_parallel_over_a_huge_generator() -> None:
    report = _run("parallel")
    assert report["count"] == COUNT
    assert report["sum"] == w.text_items_expected_sum(COUNT)
    assert report["growth_mib"] < 400, report


def test_executor_map_consumed_lazily() -> None:
    report = _run("map")
    assert report["count"] == COUNT
    assert report["sum"] == w.text_items_expected_sum(COUNT)
    assert report["growth_mib"] < 100, report
