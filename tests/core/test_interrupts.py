"""A dying worker is rescheduled at once; an interrupted ``pydra run -n`` stops everywhere and says how to resume.

The jobs are real ``pydra run -n 3`` runs of tests/core/jobs/interrupt_tasks.py,
each in a session of its own; processes are found and checked by pid, never
by name. No assertion is on time: promptness is shown by a heartbeat timeout
(600 s) far longer than the test's own timeout.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
from mpijobs import JOBS, mpi_environment
from testkit import Running, run_process, survives_losses

from pydra.launcher.mpiexec import find_mpiexec

TARGET = f"{JOBS / 'interrupt_tasks.py'}:squares"
ITEMS = [str(x) for x in range(40)]

survives_losses_here = pytest.mark.skipif(
    not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)"
)


def environment(tmp_path: Path) -> dict[str, str]:
    started = tmp_path / "started"
    started.mkdir()
    env = mpi_environment()
    env.update(STARTED_DIR=str(started), PYDRA_PROGRESS="off", PYDRA_HOME=str(tmp_path / "home"))
    return env


def wait_until_started(tmp_path: Path, job: Running, items: int = 4) -> None:
    """Until *items* items have started: the job is past its start-up and under way."""
    deadline = time.monotonic() + 120
    while len(os.listdir(tmp_path / "started")) < items:
        assert job.process.poll() is None, "".join(job.stderr)
        assert time.monotonic() < deadline, f"the job did not start\n{''.join(job.stderr)}"
        time.sleep(0.1)


def pydra_argv(words: list[str]) -> list[str]:
    """A ``pydra ...`` command line as this test's Python runs it."""
    assert words[0] == "pydra", words
    return [sys.executable, "-m", "pydra", *words[1:]]


def assert_all_gone(pids: set[int], group: int) -> None:
    """No process of *pids* is left, nor any in process group *group*."""
    deadline = time.monotonic() + 20
    while (left := {pid for pid in pids if Path(f"/proc/{pid}").exists()}):
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


@pytest.mark.smoke
@survives_losses_here
def test_a_killed_worker_is_rescheduled_at_once(tmp_path: Path) -> None:
    env = environment(tmp_path)
    env["PYDRA_HEARTBEAT_TIMEOUT"] = "600"  # the heartbeat path alone would make this test time out
    output = tmp_path / "out.json"
    job = Running(pydra_argv(["pydra", "run", "-n", "3", TARGET, *ITEMS, "--no-journal", "-o", str(output)]), env)
    try:
        wait_until_started(tmp_path, job)
        os.kill(job.rank_pid(2), signal.SIGKILL)
        status = job.wait(timeout=240)
    finally:
        job.close()
    stderr = "".join(job.stderr)
    assert status == 0, stderr
    assert json.loads(output.read_text()) == [x * x for x in range(40)]
    # MPICH: the rank's supervisor saw it die and told rank 0; Open MPI: ULFM reported the death
    how = "its process died" if find_mpiexec().ulfm else "killed by SIGKILL, says its supervisor"
    assert "pydra: lost worker rank 2" in stderr and how in stderr, stderr


@pytest.mark.parametrize("target, signum, status", [
    pytest.param("group", signal.SIGINT, 130, marks=pytest.mark.smoke),  # a terminal's Ctrl-C
    ("pid", signal.SIGINT, 130),  # an IDE's stop button, timeout -s INT
    ("pid", signal.SIGTERM, 143),
], ids=["ctrl-c", "sigint", "sigterm"])
def test_an_interrupted_job_stops_everywhere_and_resumes(tmp_path: Path, target: str, signum: int, status: int) -> None:
    env = environment(tmp_path)
    run_dir, output = tmp_path / "run", tmp_path / "out.json"
    job = Running(pydra_argv(["pydra", "run", "-n", "3", TARGET, *ITEMS, "--run-dir", str(run_dir),
                              "-o", str(output)]), env)
    try:
        wait_until_started(tmp_path, job)
        pids = set(job.processes())
        said = len(job.stderr)
        (os.killpg if target == "group" else os.kill)(job.process.pid, signum)
        assert job.wait(timeout=60) == status, "".join(job.stderr)
    finally:
        job.close()
    assert_all_gone(pids, job.process.pid)
    lines = job.stderr[said:]
    assert len(lines) <= 2 and not job.stdout, "".join(job.stderr)
    resume = f"pydra run -n 3 --resume {run_dir}"
    assert lines[-1].strip() == f"pydra: interrupted; resume with: {resume}", "".join(job.stderr)
    assert not output.exists()
    done = run_process(pydra_argv(shlex.split(resume)), timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text()) == [x * x for x in range(40)]
