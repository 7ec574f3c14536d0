"""An idle Pydra session costs (almost) no CPU: no rank busy-waits.

tests/core/jobs/job_idle.py: a 4-rank session (oversubscribed on 2 cores)
where rank 0 sleeps 5 s with nothing submitted. Every rank's process CPU time
(all its threads, time.process_time) over the whole session must stay under
0.5 s, i.e. under 10% of a core; a rank spinning in MPI_Recv or a polling loop
without sleeps would use ~5 s. The measured numbers are printed (-s).
"""

from __future__ import annotations

import pytest
from mpijobs import result_line, run_script

IDLE_SECONDS = 5.0
CPU_LIMIT = 0.5  # seconds of CPU per rank over the idle session


@pytest.mark.parametrize("ranks", [pytest.param(4, id="4-ranks"), pytest.param(2, id="2-ranks", marks=pytest.mark.smoke)])
def test_idle_session_does_not_busy_wait(ranks: int) -> None:
    finished = run_script(ranks, "job_idle.py", [str(IDLE_SECONDS)], timeout=60)
    reports = result_line(finished)
    print(f"\nidle CPU over {IDLE_SECONDS} s on {ranks} ranks: {reports}")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert sorted(r["rank"] for r in reports) == list(range(ranks))
    for report in reports:
        assert report["wall"] >= IDLE_SECONDS  # every rank really sat through the idle time
        assert report["cpu"] < CPU_LIMIT, f"rank {report['rank']} used {report['cpu']} s of CPU while idle"
    assert reports[0]["idle_cpu"] < CPU_LIMIT / 2
