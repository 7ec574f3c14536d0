"""No process of a Pydra job outlives it: after success, failure, abort or a timeout kill.

Each job here gets a unique marker among its arguments and runs in its own
session, like tests/conftest.py's run_process does, but the process-group id
(the Popen pid) is kept. Afterwards, ``ps -eo pid,ppid,pgid,args`` must show
no process in that group, none whose command line holds the marker, and
(for jobs still running when a snapshot was taken) none of the job's
descendants: mpiexec's proxies and the ranks start sessions of their own, so
the group alone would miss them. Processes are found by pid/pgid, never by
name, and nothing here kills anything but the job's own process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from testkit import stop_group
from mpijobs import JOBS, mpi_environment, mpiexec_argv

TARGETS = str(JOBS / "cli_targets.py")


@dataclass
class Tracked:
    returncode: int | None  # None: killed on timeout
    stdout: str
    stderr: str
    pgid: int
    descendants: set[int]  # seen while the job ran (only when a snapshot was asked for)
    hung: str = ""  # on a timeout: what was still running then (the job's group and descendants)


def process_table() -> list[tuple[int, int, int, str]]:
    # -ww: never cut the command line to the terminal's width (COLUMNS), or markers would be missed
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""))
    return rows


def descendants_of(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _pgid, _args in process_table():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def run_tracked(argv: list[str], timeout: float, snapshot_after: float | None = None,
                env: dict[str, str] | None = None) -> Tracked:
    """Like conftest.run_process (own session, group stopped on timeout), but report the pgid instead of failing."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or mpi_environment(),
        start_new_session=True,
    )
    seen: set[int] = set()
    hung = ""
    try:
        if snapshot_after is not None:
            try:
                stdout, stderr = process.communicate(timeout=snapshot_after)
            except subprocess.TimeoutExpired:
                seen = descendants_of(process.pid)
                stdout, stderr = process.communicate(timeout=timeout - snapshot_after)
        else:
            stdout, stderr = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        hung = still_running(process, seen)
        stop_group(process)
        stdout, stderr = process.communicate()
        code = None
    finally:
        if process.poll() is None:
            stop_group(process)
            process.wait()
    return Tracked(code, stdout, stderr, process.pid, seen, hung)


def still_running(process: subprocess.Popen, seen: set[int]) -> str:
    """What of *process*'s job runs now: its own state, then its group's and its descendants' rows of ``ps``."""
    ours = descendants_of(process.pid) | seen
    rows = [f"{pid} (pgid {pgid}, ppid {ppid}): {args}" for pid, ppid, pgid, args in process_table()
            if pgid == process.pid or pid in ours]
    state = "still running" if process.poll() is None else f"ended with {process.returncode}"
    return "\n".join([f"pid {process.pid} {state}; running at the timeout:", *rows])


def leftovers(job: Tracked, marker: str, wait: float = 10.0) -> list[str]:
    """The job's processes still alive after *wait* seconds (empty once all are gone)."""
    deadline = time.monotonic() + wait
    while True:
        alive = [
            f"{pid} (pgid {pgid}, ppid {ppid}): {args}"
            for pid, ppid, pgid, args in process_table()
            if pid != os.getpid() and (pgid == job.pgid or marker in args or pid in job.descendants)
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def marker() -> str:
    return f"pydra-cleanup-{uuid.uuid4().hex[:12]}"


def pydra_argv(ranks: int, args: list[str]) -> list[str]:
    return mpiexec_argv(ranks, [sys.executable, "-m", "pydra", "run", *args])


def self_launch_argv(ranks: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pydra", "run", "-n", str(ranks), *args]


JOBS_TO_RUN = {
    "success": (lambda m: pydra_argv(3, [f"{TARGETS}:Echo", m]), 0),
    "success-self-launched": (lambda m: self_launch_argv(3, [f"{TARGETS}:Echo", m]), 0),
    "task-fails": (lambda m: pydra_argv(3, [f"{TARGETS}:boom", "bad", m]), 1),
    "aborted": (lambda m: mpiexec_argv(3, [sys.executable, str(JOBS / "job_abort.py"), "after_block", m]), "nonzero"),
    "gang-aborted": (lambda m: pydra_argv(3, [f"{TARGETS}:HalfGangFails", m]), "nonzero"),
    "bad-target": (lambda m: pydra_argv(3, [f"{TARGETS}:Nothing", m]), 2),
}


@pytest.mark.parametrize("name", list(JOBS_TO_RUN))
def test_no_process_outlives_a_finished_job(name: str) -> None:
    make_argv, expected = JOBS_TO_RUN[name]
    tag = marker()
    job = run_tracked(make_argv(tag), timeout=60)
    assert job.returncode is not None, f"{name} did not finish in time\n{job.hung}"
    if expected == "nonzero":
        assert job.returncode != 0
    else:
        assert job.returncode == expected, job.stderr[-2000:]
    assert leftovers(job, tag) == []


@pytest.mark.smoke
def test_no_process_outlives_jobs_smoke() -> None:
    for argv_of, expected in [(lambda m: pydra_argv(2, [f"{TARGETS}:boom", "bad", m]), 1),
                              (lambda m: pydra_argv(2, [f"{TARGETS}:Echo", m]), 0)]:
        tag = marker()
        job = run_tracked(argv_of(tag), timeout=60)
        assert job.returncode == expected, job.stderr[-2000:]
        assert leftovers(job, tag) == []


@pytest.mark.parametrize("launch", ["mpiexec", "self-launched"])
def test_no_process_outlives_a_job_killed_on_timeout(launch: str) -> None:
    """A job still running at its timeout is killed by process group, and its ranks and
    mpiexec's helpers (in sessions of their own) go with it."""
    tag = marker()
    args = [f"{TARGETS}:Sleepy", "60", tag]
    argv = pydra_argv(3, args) if launch == "mpiexec" else self_launch_argv(3, args)
    job = run_tracked(argv, timeout=6, snapshot_after=3)
    assert job.returncode is None, "the sleeping job should still have been running at its timeout"
    ranks_seen = [pid for pid in job.descendants]
    assert len(ranks_seen) >= 3, "the snapshot should have found the job's ranks running"
    assert leftovers(job, tag) == []


def test_no_process_outlives_a_launcher_killed_outright() -> None:
    """``kill -9`` of ``pydra run -n 3`` alone (not its group): mpiexec, in a session of its own, ran on to the end."""
    tag = marker()
    launcher = subprocess.Popen(self_launch_argv(3, [f"{TARGETS}:Sleepy", "60", tag]), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=mpi_environment(), start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 7 and time.monotonic() < deadline:  # mpiexec, its proxy, 3 supervisors, 3 ranks
            time.sleep(0.2)
            seen = descendants_of(launcher.pid)
        assert len(seen) >= 7, "the job never started"
    finally:
        launcher.kill()
        launcher.wait()
    left = leftovers(Tracked(launcher.returncode, "", "", launcher.pid, seen, ""), tag, wait=60)
    for row in left:  # what is left of the job (alive just now): ours, stopped by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(row.split()[0]), signal.SIGKILL)
    assert left == []


def test_leftover_check_sees_a_surviving_process() -> None:
    """The check itself is not vacuous: a process holding the marker, in a session of its own, is found."""
    tag = marker()
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag], start_new_session=True)
    try:
        job = Tracked(0, "", "", pgid=-1, descendants=set())
        deadline = time.monotonic() + 10
        while not (found := leftovers(job, tag, wait=0)) and time.monotonic() < deadline:
            time.sleep(0.1)  # until the child has exec'd and shows its command line
        assert len(found) == 1 and found[0].startswith(f"{stray.pid} ")
    finally:
        os.killpg(stray.pid, signal.SIGKILL)  # our own process group only
        stray.wait()
    assert leftovers(job, tag, wait=5) == []
