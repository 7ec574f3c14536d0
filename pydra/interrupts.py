"""Stopping a ``pydra run`` job on Ctrl-C, SIGINT or SIGTERM: quietly, everywhere, with a way to resume.

``pydra run -n N`` and ``pydra launch`` start mpiexec in a session of its
own, so a terminal's Ctrl-C reaches only them; on SIGINT, SIGTERM or SIGHUP
they pass a stop on to every rank through mpiexec (and each rank's
:mod:`pydra.launcher.supervise`), wait for the job to end, and exit with 128
+ the signal (130 for Ctrl-C, 143 for SIGTERM). MPICH's mpiexec gets SIGTERM,
which it passes on. Open MPI's gets :data:`RELAYED_STOP` instead: on SIGTERM
or SIGINT it stops the ranks itself, and drops what they print meanwhile
(rank 0's line saying how to resume), while SIGUSR2 it passes on untouched.

Each rank of ``pydra run`` ends at once on those signals, without a
traceback and without MPI_Finalize (its peers are ending too). Rank 0 first
commits what its journal holds, then prints one line: that the job was
interrupted, and the command that resumes it: ``PYDRA_RESUME_WITH`` (set by
``pydra run -n`` and ``pydra launch``) followed by ``--resume RUNDIR``.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydra.config import setting

#: the signals that stop a job
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: the stop a rank gets from Open MPI's launcher, which passes SIGUSR2 on to every rank untouched
RELAYED_STOP = signal.SIGUSR2

#: longest wait for the journal's last commit before rank 0 ends anyway
FLUSH_SECONDS = 5.0

_job: dict[str, Any] = {"rank": None, "size": 1, "run_dir": None, "journal": None}


def stop_quietly() -> None:
    """From now on, end this rank of ``pydra run`` quietly on SIGINT, SIGTERM, SIGHUP or SIGUSR2 (main thread)."""
    for signum in (*STOPS, RELAYED_STOP):
        signal.signal(signum, _stop)


def joined(rank: int, size: int) -> None:
    """This process is rank *rank* of a job of *size* ranks (rank 0 reports an interrupt)."""
    _job.update(rank=rank, size=size)


def journaling(run_dir: Path | str, journal: Any) -> None:
    """Rank 0 keeps the job's journal, in *run_dir*: commit it on an interrupt, and say how to resume."""
    _job.update(run_dir=run_dir, journal=journal)


def resume_command(run_dir: Path | str) -> str:
    """The command line that finishes the job journaled in *run_dir*, run the way this one was."""
    size = _job["size"]
    prefix = setting("RESUME_WITH") or ("pydra run" if size == 1 else f"mpiexec -n {size} python -m pydra run")
    return f"{prefix} --resume {shlex.quote(str(run_dir))}"


def _stop(signum: int, frame: Any) -> None:
    if _job["rank"] == 0:
        message = "pydra: interrupted"
        if _job["journal"] is not None:
            # On a thread: the main thread may hold the journal's lock where the signal caught it.
            flush = threading.Thread(target=_commit, args=(_job["journal"],), daemon=True)
            flush.start()
            flush.join(FLUSH_SECONDS)
            message += f"; resume with: {resume_command(_job['run_dir'])}"
        # A progress bar may be on the line: rub it out first.
        from pydra.progress import progress_mode

        os.write(2, ("\r\x1b[K" if progress_mode() == "bar" else "").encode() + message.encode() + b"\n")
    # Stopped on purpose: the status is this rank's own (pydra.launcher.supervise). (No import in a
    # signal handler: a rank that never loaded pydra.startup never told a supervisor anything.)
    startup = sys.modules.get("pydra.startup")
    if startup is not None:
        startup.left()
    os._exit(128 + signum)  # no MPI_Finalize: the other ranks are ending too


def _commit(journal: Any) -> None:
    from pydra.journal import JournalError

    try:
        journal.flush()
    except JournalError:
        pass  # what it committed stays, and the resumed job computes the rest
