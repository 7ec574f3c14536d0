"""Test helpers shared by every test directory: real MPI jobs started as subprocesses, never left behind.

Every job runs in its own session (process group) and is stopped by its
process-group id if it overruns its timeout, so a hang fails one test
instead of blocking the suite, and no rank outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Finished:
    """The outcome of a subprocess job."""

    returncode: int
    stdout: str
    stderr: str


def mpi_environment() -> dict[str, str]:
    """The environment for test jobs: Open MPI allowed to run as root and oversubscribe."""
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        # The repository (for pydra) and tests/ (for testkit, which job files use too).
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
    )
    return env


def run_process(
    argv: list[str], timeout: float = 60, cwd: Path | None = None, env: dict | None = None, stdin: int | None = None
) -> Finished:
    """Run *argv* in a new session; on timeout kill its whole process group and fail the test.

    *stdin* (default: ours) is given to Popen: ``subprocess.DEVNULL`` keeps a
    command from finding a terminal to prompt on when pytest runs in one.
    """
    process = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd or ROOT,
        env=env or mpi_environment(),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(argv)} did not finish in {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    finally:
        if process.poll() is None:
            stop_group(process)
            process.wait()
    return Finished(process.returncode, stdout, stderr)


def stop_group(process: subprocess.Popen) -> None:
    """Stop *process*'s process group: SIGTERM first, so mpiexec can stop ranks it put in
    sessions of their own (Open MPI does), then SIGKILL whatever is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def mpiexec_argv(ranks: int, program: list[str]) -> list[str]:
    """``mpiexec -n ranks program...`` for the MPI this environment's mpi4py uses."""
    from pydra.launcher.mpiexec import find_mpiexec

    return find_mpiexec().command(ranks, program)


def survives_losses() -> bool:
    """Whether this MPI's jobs outlive a worker's death: MPICH (under Pydra's supervisor), Open MPI with ULFM."""
    from pydra.launcher.mpiexec import MPICH, find_mpiexec

    mpiexec = find_mpiexec()
    return mpiexec.implementation == MPICH or mpiexec.ulfm


def gang_after_losing_a_member(workers: int, x: int) -> dict:
    """What ``fault_tasks.gang_loses_a_member`` returns on *workers* worker ranks (a member dies on its first try).

    MPICH: the other members wait in its allreduce for good, so they are lost
    too and rank 0 runs the gang again by itself. ULFM: the allreduce raises on
    them, and the gang runs again on every worker left.
    """
    from pydra.launcher.mpiexec import find_mpiexec

    size = workers - 1 if find_mpiexec().ulfm else 1
    return {"sum": x * size, "size": size}


def run_mpi(ranks: int, program: list[str], timeout: float = 60, **kwargs) -> Finished:
    """Run a Python *program* (argv after the interpreter) on *ranks* ranks."""
    return run_process(mpiexec_argv(ranks, [sys.executable, *program]), timeout=timeout, **kwargs)


def run_pydra(ranks: int, args: list[str], timeout: float = 60, **kwargs) -> Finished:
    """``mpiexec -n ranks python -m pydra ARGS`` (ranks=1 runs without mpiexec)."""
    program = ["-m", "pydra", *args]
    if ranks == 1:
        return run_process([sys.executable, *program], timeout=timeout, **kwargs)
    return run_mpi(ranks, program, timeout=timeout, **kwargs)


def first_try(tag: str, item: object) -> bool:
    """True exactly once per (tag, item) across a whole job: a task misbehaves on its first try only.

    The marker files live in the directory named by ``FAULT_DIR``, so every
    rank and isolated child of the job agrees.
    """
    path = os.path.join(os.environ["FAULT_DIR"], f"{tag}-{item}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class Running:
    """A job started in a session of its own that a test signals while it runs; its stderr read as it comes.

    Its processes are found by parent links from its pid (mpiexec's proxies
    and the ranks sit in sessions of their own), never by name; :meth:`close`
    stops whatever is left by process group.
    """

    def __init__(self, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        import threading

        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT,
            env=env or mpi_environment(), start_new_session=True,
        )
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._readers = [threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
                         for s, into in ((self.process.stderr, self.stderr), (self.process.stdout, self.stdout))]
        for reader in self._readers:
            reader.start()

    def processes(self) -> dict[int, str]:
        """pid -> command line of the job's processes now: the job's own and all below it."""
        table: dict[int, tuple[int, str]] = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), b" ".join(argv).decode(errors="replace"))
        found, frontier = set(), {self.process.pid}
        while frontier:
            found |= frontier
            frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        return {pid: table[pid][1] for pid in found if pid in table}

    def rank_pid(self, rank: int) -> int:
        """The pid of MPI rank *rank* (the ``pydra run`` process itself, not its supervisor)."""
        for pid, command in self.processes().items():
            if "-m pydra run" not in command or "supervise" in command:
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in environ or f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                return pid
        raise LookupError(f"no rank {rank} among {self.processes()}")

    def wait(self, timeout: float) -> int:
        """The exit status; fail the test if the job has not ended within *timeout* seconds."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"the job did not end in {timeout} s\nstderr:\n{''.join(self.stderr)}")
        for reader in self._readers:
            reader.join(timeout=10)
        return status

    def close(self) -> None:
        if self.process.poll() is None:
            stop_group(self.process)
            self.process.wait()
