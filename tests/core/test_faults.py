"""Failing tasks: retries with backoff, allow_failures, timeouts, isolation, atomic maps.

Each test runs a target of tests/core/jobs/fault_tasks.py with ``pydra run``
(real mpiexec for 2 and 3 ranks, one process for 1) and checks the result
against the serial answer, or the one-line error naming the item and rank.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydra
import pytest
from mpijobs import JOBS, mpi_environment, rank_params, run_pydra, stop_group
from testkit import Running, gang_after_losing_a_member, run_mpi, run_process, survives_losses

from pydra.launcher.mpiexec import MPICH, find_mpiexec

TARGETS = JOBS / "fault_tasks.py"
ITEMS = [str(x) for x in range(30)]
SQUARES = [x * x for x in range(30)]


def run_target(tmp_path: Path, ranks: int, name: str, items: list[str], *flags: str, timeout: float = 90, journal: bool = False):
    """``pydra run fault_tasks.py:NAME ITEMS -o result.json [--no-journal]``; (finished, result or None)."""
    faults = tmp_path / "faults"
    faults.mkdir(exist_ok=True)
    env = mpi_environment()
    env["FAULT_DIR"] = str(faults)
    output = tmp_path / "result.json"
    args = ["run", f"{TARGETS}:{name}", *items, "-o", str(output), *([] if journal else ["--no-journal"]), *flags]
    finished = run_pydra(ranks, args, timeout=timeout, env=env)
    result = json.loads(output.read_text()) if output.exists() else None
    return finished, result


def last_pydra_line(stderr: str) -> str:
    """The last line Pydra wrote (Open MPI's launcher may add its own notice after it)."""
    return [line for line in stderr.splitlines() if line.startswith("pydra: ")][-1]


def tried(tmp_path: Path, tag: str) -> list[str]:
    return sorted(path.name for path in (tmp_path / "faults").glob(f"{tag}-*"))


@pytest.mark.parametrize("ranks", rank_params(1, 2, 3))
def test_a_raising_item_is_retried_and_the_result_is_exact(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "raises_once", ITEMS)
    assert finished.returncode == 0, finished.stderr
    assert result == SQUARES
    assert len(tried(tmp_path, "raise")) == 10  # every third item failed once


@pytest.mark.parametrize("ranks", rank_params(1, 3))
def test_without_retries_the_first_failure_fails_the_job_naming_item_and_rank(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "raises_once_no_retry", ITEMS)
    assert finished.returncode == 1 and result is None
    last = last_pydra_line(finished.stderr)
    assert last.startswith("pydra: ") and "ValueError: first try of" in last
    assert "on its only try" in last and "on rank" in last and "item" in last


@pytest.mark.parametrize("ranks", rank_params(1, 3))
def test_allowed_failures_leave_markers_in_the_result(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "bad_sevens_allowed", ITEMS)
    assert finished.returncode == 0, finished.stderr
    failed = {index for index, value in enumerate(result) if isinstance(value, dict)}
    assert failed == {7, 17, 27}
    assert all(result[i] == i * i for i in range(30) if i not in failed)
    assert result[17] == {"item_failed": 17, "error": "ValueError: 17 is unlucky"}
    assert finished.stderr.count("failed for good, allowed") == 3


@pytest.mark.parametrize("ranks", rank_params(1, 3))
def test_more_failures_than_allowed_fail_the_job(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "bad_sevens_too_many", ITEMS)
    assert finished.returncode == 1 and result is None
    assert "is unlucky" in last_pydra_line(finished.stderr)


@pytest.mark.parametrize("ranks", rank_params(2, 3))
@pytest.mark.parametrize("isolate", [False, True], ids=["in-rank", "isolated"])
def test_a_hang_past_the_timeout_is_stopped_and_retried(tmp_path, ranks, isolate):
    flags = ["--isolate"] if isolate else []
    finished, result = run_target(tmp_path, ranks, "hangs_once", ITEMS[:10], *flags)
    assert finished.returncode == 0, finished.stderr
    assert result == SQUARES[:10]
    assert tried(tmp_path, "hang") == ["hang-5"]


@pytest.mark.parametrize("ranks", rank_params(3))
def test_a_hang_without_retries_fails_with_a_timeout(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "hangs_no_retry", ITEMS[:10])
    assert finished.returncode == 1
    last = last_pydra_line(finished.stderr)
    assert "UnitTimeout: ran past its timeout of 1 s" in last and "item 5" in last
    # The worker's traceback ends where the task was interrupted, not in Pydra's timeout handler.
    frames = re.findall(r'^  File "([^"]+)", line \d+, in (\w+)$', finished.stderr, re.M)
    assert frames and frames[-1] == (str(TARGETS), "work"), finished.stderr


@pytest.mark.parametrize("ranks", rank_params(2, 3))
def test_isolated_crashes_cost_one_try_not_the_rank(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "crashes_once", ITEMS[:10], "--isolate")
    assert finished.returncode == 0, finished.stderr
    assert result == SQUARES[:10]
    assert tried(tmp_path, "segv") == ["segv-4"] and tried(tmp_path, "exit") == ["exit-6"]


@pytest.mark.parametrize("ranks", rank_params(3))
def test_an_isolated_crash_without_retries_names_the_signal(tmp_path, ranks):
    finished, result = run_target(tmp_path, ranks, "crashes_no_retry", ITEMS[:10], "--isolate")
    assert finished.returncode == 1
    assert "TaskProcessDied: the task's process" in finished.stderr
    assert "was killed by SIGSEGV" in finished.stderr or "exited with status 3" in finished.stderr


@pytest.mark.skipif(not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)")
def test_a_worker_lost_to_a_tasks_exit_status_leaves_a_job_that_recovered_ending_with_0(tmp_path):
    """``pydra run -n 3``: a task's ``os._exit(9)`` ends its worker rank; the job reschedules and succeeds.

    The lost rank's supervisor used to exit with the rank's 9, which mpiexec
    passed on: a batch script saw a job that had printed its result fail.
    """
    faults = tmp_path / "faults"
    faults.mkdir()
    output = tmp_path / "result.json"
    env = {**mpi_environment(), "FAULT_DIR": str(faults)}
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", "3", f"{TARGETS}:exits_once", *ITEMS[:12],
                            "-o", str(output), "--no-journal"], timeout=120, env=env)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(output.read_text()) == SQUARES[:12]
    assert "lost worker rank" in finished.stderr


@pytest.mark.skipif(not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)")
@pytest.mark.parametrize("status", [0, 7])
def test_a_task_that_exits_wherever_it_runs_fails_the_job_in_one_line(tmp_path, status):
    """Item 3's ``os._exit(N)`` ends each worker in turn, then rank 0, which runs what is left itself.

    With 0 it used to end the job with 0, no result and no word (and each
    worker was missed only by its heartbeats, 10 s apiece); with 7, with 7
    and no word.
    """
    output = tmp_path / "result.json"
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", "3", f"{TARGETS}:exits_always", *ITEMS[:6],
                            "-o", str(output), "--no-journal"], timeout=120, env={**mpi_environment(),
                                                                                   "EXIT_STATUS": str(status)})
    assert finished.returncode == 1 and not output.exists(), finished.stderr
    assert f"exited with status {status} in the middle of the job" in last_pydra_line(finished.stderr)
    assert "no heartbeat" not in finished.stderr  # each worker's supervisor told rank 0 at once


@pytest.mark.skipif(not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)")
def test_with_isolation_a_lost_worker_costs_no_other_workers_task(tmp_path):
    """``pydra run -n 3 --isolate``, worker rank killed: the other worker's task process lives on.

    MPICH's launcher signals SIGUSR1 to every other rank's process group when
    one ends; an isolated task process, in its rank's group, died of it, and
    the job (no retries) failed with ``TaskProcessDied: ... SIGUSR1``.
    """
    faults = tmp_path / "faults"
    faults.mkdir()
    output = tmp_path / "result.json"
    env = {**mpi_environment(), "FAULT_DIR": str(faults)}
    job = subprocess.Popen([sys.executable, "-m", "pydra", "run", "-n", "3", "--isolate", f"{TARGETS}:slow_no_retry",
                            *ITEMS[:16], "-o", str(output), "--no-journal"], env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks := list(faults.glob("rank-*"))) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert marks, "item 0 never ran"
        os.kill(int(marks[0].name.split("-")[1]), signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        stop_group(job)
    assert job.returncode == 0, stderr
    assert json.loads(output.read_text()) == SQUARES[:16]
    assert "lost worker rank" in stderr and "SIGUSR1" not in stderr


@pytest.mark.parametrize("ranks", rank_params(1, 3))
@pytest.mark.parametrize("isolate", [False, True], ids=["in-rank", "isolated"])
def test_a_map_that_fails_half_way_is_retried_without_counting_pairs_twice(tmp_path, ranks, isolate):
    words = ["apple", "cherry", "banana", "cabbage", "date"] * 3
    flags = ["--isolate"] if isolate else []
    finished, result = run_target(tmp_path, ranks, "words_once", words, *flags)
    assert finished.returncode == 0, finished.stderr
    assert result == dict(sorted(Counter("".join(words)).items()))
    assert tried(tmp_path, "map") == ["map-cabbage", "map-cherry"]


@pytest.mark.parametrize("ranks", rank_params(3))
def test_a_result_over_the_size_limit_fails_with_one_line(tmp_path, ranks, monkeypatch):
    monkeypatch.setenv("PYDRA_MAX_RESULT_BYTES", "1000")
    finished, result = run_target(tmp_path, ranks, "big_results", ["a", "b"])
    assert finished.returncode == 1 and result is None
    last = last_pydra_line(finished.stderr)
    assert "is larger than PYDRA_MAX_RESULT_BYTES=1000" in last and "on rank" in last
    assert "in item 0," in last or "in item 1," in last  # whichever worker answered first


def test_bad_retry_settings_are_refused():
    with pytest.raises(ValueError, match="retries must be 0 or more"):
        pydra.Parallel(abs, retries=-1)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        pydra.Parallel(abs, timeout=0)
    with pytest.raises(ValueError, match="allow_failures must be 0 or more"):
        pydra.Parallel(abs, allow_failures=-2)


@pytest.mark.parametrize("ranks", rank_params(1, 3))
def test_a_journaled_run_records_each_item_once_and_resumes_without_recomputing(tmp_path, ranks):
    items = [str(x) for x in range(300)]
    run_dir = tmp_path / "run"
    finished, result = run_target(tmp_path, ranks, "raises_once", items, "--run-dir", str(run_dir), journal=True)
    assert finished.returncode == 0, finished.stderr
    assert result == [x * x for x in range(300)]
    assert f"run directory {run_dir}" in finished.stderr
    with sqlite3.connect(run_dir / "journal.sqlite") as db:
        units = db.execute("SELECT start, count FROM units WHERE node = 'r' ORDER BY start").fetchall()
        states = [state for (state,) in db.execute("SELECT state FROM transitions ORDER BY rowid")]
    assert [start for start, _ in units] == list(itertools.accumulate([0] + [count for _, count in units[:-1]]))
    assert sum(count for _, count in units) == 300
    assert states == ["queued", "running", "done"]

    # Resuming a finished run recomputes nothing: no task runs (no new marker), same result.
    (tmp_path / "result.json").unlink()
    markers = tried(tmp_path, "raise")
    resumed = run_pydra(ranks, ["run", "--resume", str(run_dir)], env=mpi_environment() | {"FAULT_DIR": str(tmp_path / "faults")})
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(units)} units journaled)" in resumed.stderr
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert tried(tmp_path, "raise") == markers

    # --output given with --resume sends the result there this time (it was ignored).
    elsewhere = tmp_path / "elsewhere.json"
    again = run_pydra(ranks, ["run", "--resume", str(run_dir), "--output", str(elsewhere)],
                      env=mpi_environment() | {"FAULT_DIR": str(tmp_path / "faults")})
    assert again.returncode == 0, again.stderr
    assert json.loads(elsewhere.read_text()) == result


@pytest.mark.skipif(find_mpiexec().implementation != MPICH,
                    reason="MPICH's queue is the one that filled; under ULFM MPI reports rank 0's death itself")
def test_workers_stop_on_rank_0s_silence_however_many_beats_it_missed() -> None:
    """Rank 0 killed: each worker stops once rank 0 has been silent for PYDRA_HEARTBEAT_TIMEOUT.

    With a long timeout the workers' beats filled MPICH's queue to the dead
    rank 0 (about 64 of them), and the next blocking Send spun for good: two
    workers at 100% of a core, never stopping. (Here 0.05 s beats fill it in
    about 3 s, well before the 8 s timeout.)
    """
    env = {**mpi_environment(), "PYDRA_HEARTBEAT": "0.05", "PYDRA_HEARTBEAT_TIMEOUT": "8"}
    job = Running([sys.executable, "-m", "pydra", "run", "-n", "3", "--no-journal",
                   str(JOBS / "cli_targets.py") + ":Sleepy", "120"], env=env)
    try:
        deadline = time.monotonic() + 60
        while "pydra: " not in "".join(job.stderr) and time.monotonic() < deadline:  # past start-up
            time.sleep(0.1)
        os.kill(job.rank_pid(0), signal.SIGKILL)
        job.wait(timeout=90)
    finally:
        job.close()
    said = "".join(job.stderr)
    assert said.count("pydra: rank 0 has been silent for 8 s; rank ") == 2, said


def test_a_run_directory_in_use_is_refused_in_one_line(tmp_path):
    """The same command twice at once on one --run-dir: the second resumed the first's job beside it, then
    died in tracebacks (``job 1 cannot go from done to done``) and MPI_Abort."""
    faults = tmp_path / "faults"
    faults.mkdir()
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pydra", "run", f"{TARGETS}:slow_no_retry", *ITEMS[:16], "--run-dir", str(run_dir)]
    env = {**mpi_environment(), "FAULT_DIR": str(faults)}
    first = subprocess.Popen([*command, "-o", str(tmp_path / "first.json")], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(faults.glob("rank-*")) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = run_process([*command, "-o", str(tmp_path / "second.json")], timeout=60, env=env)
        _, stderr = first.communicate(timeout=120)
    finally:
        stop_group(first)
    assert second.returncode == 2 and not (tmp_path / "second.json").exists()
    assert second.stderr.splitlines()[-1] == (f"pydra: error: {run_dir} is in use by another run (pid {first.pid}): "
                                              "let it end, or give another run directory")
    assert first.returncode == 0, stderr
    assert json.loads((tmp_path / "first.json").read_text()) == SQUARES[:16]


@pytest.mark.parametrize("ranks", rank_params(1, 3))
def test_the_same_command_again_resumes_the_job_its_run_dir_journals(tmp_path, ranks):
    """A requeued batch job runs its script again: --run-dir DIR finds its own journal and resumes it."""
    items = [str(x) for x in range(40)]
    run_dir = tmp_path / "run"
    first, result = run_target(tmp_path, ranks, "raises_once", items, "--run-dir", str(run_dir), journal=True)
    assert first.returncode == 0, first.stderr
    (tmp_path / "result.json").unlink()
    markers = tried(tmp_path, "raise")
    again, resumed = run_target(tmp_path, ranks, "raises_once", items, "--run-dir", str(run_dir), journal=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming {TARGETS}:raises_once from {run_dir}" in again.stderr
    assert resumed == result and tried(tmp_path, "raise") == markers  # nothing computed twice
    with sqlite3.connect(run_dir / "journal.sqlite") as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (1,)

    # Another job (other inputs, another target, an edited task file) is refused, not mixed in.
    other, _ = run_target(tmp_path, ranks, "raises_once", items[:5], "--run-dir", str(run_dir), journal=True)
    assert other.returncode == 2
    assert last_pydra_line(other.stderr) == (
        f"pydra: error: {run_dir} journals another job (with the inputs {' '.join(items)}): "
        f"give a new --run-dir, or finish that one with --resume {run_dir}"
    )
    copy, copy_dir = tmp_path / "copied_tasks.py", tmp_path / "copy-run"
    copy.write_text(TARGETS.read_text())
    command = ["run", f"{copy}:raises_once", "7", "--run-dir", str(copy_dir)]
    env = mpi_environment() | {"FAULT_DIR": str(tmp_path / "faults")}
    assert run_pydra(1, command, env=env).returncode == 0
    copy.write_text(TARGETS.read_text() + "\n# edited\n")
    edited = run_pydra(1, command, env=env)
    assert edited.returncode == 2 and f"journals another job (of an earlier version of {copy}:raises_once)" in edited.stderr


def test_resume_needs_a_journal(tmp_path):
    finished = run_pydra(1, ["run", "--resume", str(tmp_path)])
    assert finished.returncode == 2
    assert last_pydra_line(finished.stderr) == (
        f"pydra: error: no journal in {tmp_path}: expected {tmp_path}/journal.sqlite (was it made with --run-dir?)"
    )
    finished = run_pydra(1, ["run", "--resume", str(tmp_path), "x.py:T"])
    assert finished.returncode == 2 and "--resume DIR takes no TARGET" in finished.stderr


survives_losses_here = pytest.mark.skipif(
    not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)"
)


@pytest.mark.smoke
@survives_losses_here
@pytest.mark.parametrize("ranks", rank_params(4))
def test_a_mapreduce_survives_losing_a_rank_that_held_pairs(tmp_path, ranks, monkeypatch):
    monkeypatch.setenv("PYDRA_HEARTBEAT_TIMEOUT", "2")
    words = ["apple", "cherry", "banana", "date", "fig", "grape"] * 4 + ["kill"] + ["lemon", "mango"] * 4
    finished, result = run_target(tmp_path, ranks, "map_kills_its_rank", words)
    assert finished.returncode == 0, finished.stderr
    assert result == dict(sorted(Counter("".join(words)).items()))
    assert "pydra: lost worker rank" in finished.stderr
    # MPICH: Pydra's supervisor saw the SIGKILL; Open MPI: ULFM reported the death
    assert "was killed by SIGKILL" in finished.stderr or "(its process died)" in finished.stderr
    # Nothing is stuck: rank 0 ends without MPI_Abort, which srun would turn into a failed step (137).
    assert "MPI_Abort" not in finished.stderr


@pytest.mark.smoke
@survives_losses_here
@pytest.mark.parametrize("ranks", rank_params(4))
def test_a_gang_that_loses_a_member_runs_again_on_what_is_left(tmp_path, ranks, monkeypatch):
    monkeypatch.setenv("PYDRA_HEARTBEAT_TIMEOUT", "2")
    finished, result = run_target(tmp_path, ranks, "gang_loses_a_member", ["5"])
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert result == gang_after_losing_a_member(3, 5)
    if find_mpiexec().ulfm:
        # The allreduce raised on the other two: they run the gang again, and nothing is stuck, so
        # rank 0 ends without MPI_Abort (which PRRTE's teardown can turn into a failed launch).
        assert finished.stderr.count("pydra: lost worker rank") == 1, finished.stderr
        assert "MPI_ABORT" not in finished.stdout + finished.stderr.upper()
    else:
        # The other two wait in the dead member's allreduce for good: lost too, and only MPI_Abort ends them.
        assert "was in a collective with lost rank" in finished.stderr
        assert "no worker rank is left; rank 0 runs the remaining work itself" in finished.stderr
        assert "are blocked in MPI with a lost rank; ending the job with MPI_Abort(0)" in finished.stderr


@pytest.mark.smoke
@pytest.mark.skipif(not find_mpiexec().ulfm, reason="MPI reports a dead rank 0 to the workers only under ULFM")
def test_under_ulfm_the_workers_of_a_dead_master_stop_with_one_line_each():
    finished = run_mpi(3, [str(JOBS / "job_master_dies.py")], timeout=120, env=mpi_environment())
    assert finished.returncode != 0
    said = [line for line in finished.stderr.splitlines() if line.startswith("pydra: ")]
    # (the launcher may end the other worker before it speaks: the first to stop exits with 1)
    assert said and set(said) <= {"pydra: rank 0 died; rank 1 stops", "pydra: rank 0 died; rank 2 stops"}, finished.stderr
    assert "Traceback" not in finished.stderr
