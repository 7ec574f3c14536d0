"""The benchmarks that need no MPI job still run: the code they reach into (the scheduler, ``_Call``) moves on.

The others start MPI jobs for minutes and are run by hand (README, "Performance").
"""

from __future__ import annotations

import sys

from testkit import ROOT, run_process


def test_submit_parts_measures_every_part() -> None:
    finished = run_process([sys.executable, str(ROOT / "benchmarks" / "submit_parts.py")], timeout=120)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert len(lines) == 6 and lines[-1].endswith("us  in all, per call"), finished.stdout
