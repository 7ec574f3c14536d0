"""Every container and several nestings give the serial answer on 1, 2, 3 and 4 ranks.

One MPI job per rank count runs all the trees of ``jobs/trees.py`` (Task,
function, Sequence, Parallel with items/chunksize/empty input, Parallel of
Sequence of Parallel, Parallel of Parallel, MapReduce with and without
combine and with mixed keys, MapReduce inside Parallel, progress reports, a
gang using every collective in object and buffer form, gangs inside a
Parallel) and compares each result with its serial computation.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_mpi, run_process
import sys

JOB = str(ROOT / "tests" / "core" / "jobs" / "trees.py")


def results(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the job printed no RESULT line:\n{stdout}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.smoke), 3, 4])
def test_trees_match_serial(ranks: int) -> None:
    if ranks == 1:
        done = run_process([sys.executable, JOB], timeout=120)
    else:
        done = run_mpi(ranks, [JOB], timeout=120)
    assert done.returncode == 0, done.stderr
    report = results(done.stdout)
    expected_cases = 17 if ranks <= 2 else 18  # gangs of 2 inside a Parallel need 2 workers
    assert len(report) == expected_cases
    mismatched = {name: pair for name, pair in report.items() if pair[0] != pair[1]}
    assert not mismatched
