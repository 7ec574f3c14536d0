"""A rank lost during start-up ends the job with one line, never a hang (issue 13, item 1).

Each test runs ``pydra run -n 4`` (every rank supervised; Open MPI with ULFM) of
tests/core/jobs/startup_loss.py with one rank killed by SIGKILL at one
start-up step: before MPI starts (a ``sitecustomize`` test hook), while the
TARGET is shipped or loaded, and inside each start-up collective. The job
must end, non-zero, with one line on stderr naming the rank and the step,
within a timeout far below "forever" and with nothing left running.
"""

from __future__ import annotations

import re
import sys
import uuid

import pytest
from mpijobs import JOBS, mpi_environment
from test_cleanup import leftovers, run_tracked

from pydra import startup
from pydra.launcher.mpiexec import MPICH, find_mpiexec

pytestmark = pytest.mark.skipif(
    not (find_mpiexec().implementation == MPICH or find_mpiexec().ulfm),
    reason="how the supervisor ends a job is known for MPICH's and Open MPI 5's launchers (with ULFM)",
)

TARGET = f"{JOBS / 'startup_loss.py'}:Tiny"
HOOK = JOBS / "startup_hook"
#: FAULT_STEP -> what the supervisor's line says about when the rank was lost (None: either of two steps)
STEPS = {
    "start": "before it had started MPI",
    "ship": None,  # killed by rank 0 from outside: it may still be agreeing on sealing
    "load": startup.STEPS["bcast-spec"],
    "gather-problems": startup.STEPS["gather-problems"],
    "bcast-failures": startup.STEPS["bcast-failures"],
    "gather-hosts": startup.STEPS["gather-hosts"],
}


def run_losing(rank: int, step: str, how: str = "kill"):
    """``pydra run -n 4`` losing *rank* at *step* (*how*: ``kill`` or ``exit``); the tracked job and its marker."""
    tag = f"pydra-startup-{uuid.uuid4().hex[:12]}"
    env = mpi_environment()
    env.update(FAULT_TAG=tag, FAULT_STEP=step, FAULT_RANK=str(rank), FAULT_HOW=how,
               PYTHONPATH=f"{HOOK}:{env['PYTHONPATH']}")
    argv = [sys.executable, "-m", "pydra", "run", "-n", "4", "--no-journal", TARGET, "a", "b", "c", tag]
    return run_tracked(argv, timeout=120, env=env), tag


#: also run on Open MPI in CI: a loss before MPI's start-up, and one inside a start-up collective
SMOKE = {(2, "start"), (2, "gather-problems")}


@pytest.mark.parametrize("rank, step", [
    pytest.param(rank, step, marks=pytest.mark.smoke if (rank, step) in SMOKE else ())
    for rank, step in [(2, step) for step in STEPS] + [(0, "start"), (0, "load"), (0, "gather-hosts")]
])
def test_a_rank_lost_at_start_up_ends_the_job_with_one_line(rank: int, step: str) -> None:
    job, tag = run_losing(rank, step)
    assert job.returncode is not None, \
        f"the job hung after losing rank {rank} at {step}:\n{job.stderr[-3000:]}\n{job.hung}"
    assert job.returncode == 1, job.stderr[-3000:]  # a failure, as `pydra run` documents, whatever Hydra's status
    said = re.findall(rf"^pydra: rank {rank} \(pid \d+\) was killed by SIGKILL during start-up, (.*); ending the job$",
                      job.stderr, re.M)
    assert len(said) == 1, job.stderr[-3000:]
    # Rank 0 loads the TARGET before it ships it: still in the step after sealing's agreement.
    expected = STEPS[step] if rank != 0 or step != "load" else startup.STEPS["start-sealing"]
    if expected is not None:
        assert said[0] == expected
    else:
        assert said[0] in (startup.STEPS["start-sealing"], startup.STEPS["bcast-spec"])
    assert only_that_line(job.stderr), job.stderr[-3000:]
    assert leftovers(job, tag) == []


#: what MPI's launchers themselves may say as the job is ended: Hydra's proxies complain of the killed rank;
#: Open MPI's prterun, stopped while ranks are still connecting to it, logs "[host:pid] PMIX ERROR: ..."
LAUNCHER_LINE = re.compile(r"\[proxy:|\[mpiexec@|\[[\w.-]+:\d+\] PMIX ERROR: ")


def only_that_line(stderr: str) -> bool:
    """Pydra said one line, and nothing else spoke but MPI's launcher."""
    lines = stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith("pydra: ")]
    return len(ours) == 1 and all(line.startswith("pydra: ") or LAUNCHER_LINE.match(line) for line in lines)


@pytest.mark.parametrize("rank, step", [(2, "load"), (2, "gather-hosts"), (0, "gather-hosts")])
def test_a_rank_that_exits_at_start_up_ends_the_job_with_one_line(rank: int, step: str) -> None:
    """An exit the other ranks did not agree on (os._exit in the TARGET's import, say) is a loss too."""
    job, tag = run_losing(rank, step, how="exit")
    assert job.returncode is not None, \
        f"the job hung after rank {rank} exited at {step}:\n{job.stderr[-3000:]}\n{job.hung}"
    assert job.returncode == 1, job.stderr[-3000:]  # a failure, as `pydra run` documents, whatever Hydra's status
    said = re.findall(rf"^pydra: rank {rank} \(pid \d+\) exited with status 3 during start-up, (.*); ending the job$",
                      job.stderr, re.M)
    assert len(said) == 1 and only_that_line(job.stderr), job.stderr[-3000:]
    assert leftovers(job, tag) == []


def test_without_a_loss_the_same_job_succeeds() -> None:
    """The hooks themselves are inert unless asked: the same job, no step chosen, finishes."""
    job, tag = run_losing(2, "")
    assert job.returncode == 0, job.stderr[-3000:]
    assert "['a', 'b', 'c'," in job.stdout
    assert leftovers(job, tag) == []
