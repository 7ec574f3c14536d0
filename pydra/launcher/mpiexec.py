"""Finding the ``mpiexec`` that belongs to mpi4py's MPI library, and the flags it needs.

MPICH's and Open MPI's launchers are not interchangeable: a job started by
the wrong one comes up as N unrelated one-rank jobs. So Pydra asks mpi4py
which library it loads and checks that the mpiexec it found says the same.
This module never initialises MPI: the process that launches a job is not
part of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydra.config import setting

MPICH = "MPICH"
OPEN_MPI = "Open MPI"
#: the supervisor of one rank (run by path: it starts without site-packages)
SUPERVISOR = str(Path(__file__).with_name("supervise.py"))


class MPIExecError(RuntimeError):
    """No usable mpiexec (an installation problem, not a bug in the job)."""


@dataclass(frozen=True)
class MPIExec:
    """An mpiexec program and the MPI implementation it launches."""

    path: str
    implementation: str

    def command(self, ranks: int, program: list[str]) -> list[str]:
        """The argv that starts *program* on *ranks* local ranks.

        Under MPICH each rank runs under :mod:`pydra.launcher.supervise` with
        ``-disable-auto-cleanup``, so the job survives the death of a worker
        rank (Hydra otherwise kills every rank when one dies by a signal).
        The supervisor runs as a script with ``-I -S``: without ``site`` (and
        an editable install's import hooks) a Python starts in a third of the
        time, and it needs nothing but the standard library.
        """
        flags: list[str] = []
        if self.implementation == MPICH:
            flags.append("-disable-auto-cleanup")
            program = [sys.executable, "-I", "-S", SUPERVISOR, *program]
        if self.implementation == OPEN_MPI:
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                flags.append("--allow-run-as-root")
            if ranks > (os.cpu_count() or 1):
                flags.append("--oversubscribe")
        return [self.path, *flags, "-n", str(ranks), *program]


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
            continue
        found = _launcher_implementation(path)
        if found == implementation or implementation not in (MPICH, OPEN_MPI):
            return MPIExec(path, implementation)
        if explicit:
            raise MPIExecError(f"PYDRA_MPIEXEC={explicit} launches {found}, but mpi4py uses {implementation}")
    raise MPIExecError(
        f"no mpiexec for {implementation} found (looked at {', '.join(candidates)}); "
        "install one with `pip install pydra-mpi[mpich]` or set PYDRA_MPIEXEC"
    )


def _candidates() -> list[str]:
    import mpi4py

    places = [str(Path(sys.executable).parent / "mpiexec")]
    mpicc = mpi4py.get_config().get("mpicc")
    if mpicc:
        places.append(str(Path(mpicc).parent / "mpiexec"))
    places.append("mpiexec")
    return list(dict.fromkeys(places))


def _launcher_implementation(path: str) -> str:
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "HYDRA" in text or "MPICH" in text:
        return MPICH
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text:
        return OPEN_MPI
    return "unknown"
