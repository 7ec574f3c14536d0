"""Telling a rank's supervisor how far the rank's start-up has got.

Until every rank has joined the session, the ranks wait for each other in
MPI's start-up and in collectives: a rank lost then (killed, say) would leave
the others waiting forever, since the heartbeats that notice a lost worker
only start with the session. Under ``pydra run -n`` (MPICH) each rank runs
under :mod:`pydra.launcher.supervise`, which hands it the write end of a pipe
in ``PYDRA_STARTUP_FD``. The rank writes one line to it at each start-up
step and ``joined`` once the session has started, then closes it. If the
rank dies before that, its supervisor says which rank was lost and in which
step, and ends the job rather than let it hang (see that module).

Without a supervisor (another launcher, or plain ``mpiexec``) nothing is
written: the launcher itself ends a job whose rank was killed.
"""

from __future__ import annotations

import os

from pydra.config import setting
from pydra.launcher.supervise import JOINED

#: collective label -> the start-up step a rank is in from when it enters that collective until the next
STEPS = {
    "start-sealing": "after MPI's start-up, before the TARGET was shipped",
    "bcast-spec": "while the TARGET was shipped to the workers and loaded there",
    "gather-problems": "while the ranks reported whether the TARGET loaded",
    "bcast-failures": "while rank 0 told the ranks whether the TARGET loaded everywhere",
    "gather-hosts": "while the session started",
}

_fd: int | None = None
_read = False


def _supervisor_fd() -> int | None:
    """The pipe to this rank's supervisor, read once and dropped from the environment.

    Dropped so that processes this rank starts (isolated task processes) do
    not take the number for a pipe of their own.
    """
    global _fd, _read
    if not _read:
        _read = True
        text = setting("STARTUP_FD")
        os.environ.pop("PYDRA_STARTUP_FD", None)
        _fd = int(text) if text.isdigit() else None
    return _fd


def reached(label: str) -> None:
    """Tell the supervisor (if any) that this rank is entering start-up collective *label*."""
    step = STEPS.get(label)
    fd = _supervisor_fd()
    if step is not None and fd is not None:
        _write(fd, step)


def joined() -> None:
    """Tell the supervisor (if any) that this rank's start-up is over; a later loss is the session's to handle."""
    global _fd
    fd = _supervisor_fd()
    if fd is not None:
        _write(fd, JOINED)
        os.close(fd)
        _fd = None


def _write(fd: int, line: str) -> None:
    try:
        os.write(fd, f"{line}\n".encode())
    except OSError:
        pass  # no supervisor reading any more: nothing to tell
