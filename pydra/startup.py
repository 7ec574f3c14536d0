"""Telling a rank's supervisor how far the rank's start-up has got.

Until every rank has joined the session, the ranks wait for each other in
MPI's start-up and in collectives: a rank lost then (killed, say) would leave
the others waiting forever, since the heartbeats that notice a lost worker
only start with the session. Under ``pydra run -n`` and ``pydra launch``
each rank runs under :mod:`pydra.launcher.supervise`, which hands it the write end of a pipe
in ``PYDRA_STARTUP_FD``. The rank writes one line to it at each start-up
step, ``joined`` once the session has started and ``left`` once it is over
(or the rank ends on purpose). If the rank dies before ``joined``, its
supervisor says which rank was lost and in which step, and ends the job
rather than let it hang; a worker that dies between ``joined`` and ``left``
was lost in the session, which goes on without it (see that module).

Without a supervisor (another launcher, or plain ``mpiexec``) nothing is
written: MPICH's launcher itself ends a job whose rank was killed.

Under Open MPI's ULFM the others do hear of a loss: a start-up collective
raises on them (:func:`lost` says what they do then).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from pydra import interrupts
from pydra.config import setting
from pydra.launcher.supervise import JOINED, LEFT

_AFTER_MPI_STARTED = "after MPI's start-up, before the TARGET was shipped"
#: collective label -> the start-up step a rank is in from when it enters that collective until the next
STEPS = {
    "start-sealing": _AFTER_MPI_STARTED,
    "start-sharing": _AFTER_MPI_STARTED,  # pydra.comm.mpi: unsealed jobs only
    "share-cores": _AFTER_MPI_STARTED,  # pydra.cpus
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
    fd = _supervisor_fd()
    if fd is not None:
        _write(fd, JOINED)


def left() -> None:
    """Tell the supervisor (if any) that this rank is out of its session: however it ends now is its own doing.

    The pipe stays open: a script may start another session.
    """
    fd = _supervisor_fd()
    if fd is not None:
        _write(fd, LEFT)


def _write(fd: int, line: str) -> None:
    try:
        os.write(fd, f"{line}\n".encode())
    except OSError:
        pass  # no supervisor reading any more: nothing to tell


def lost(rank: int, size: int, failed: list[int], label: str) -> None:
    """MPI (ULFM) says ranks *failed* died while this one, *rank* of *size*, was in start-up collective *label*.

    The caller ends this rank afterwards. Under a supervisor, the lost
    rank's own supervisor says which rank was lost, how and when, and ends
    the job: this rank only tells its supervisor that it was not lost
    itself, and waits (up to ``PYDRA_HEARTBEAT_TIMEOUT`` seconds) to be
    stopped with the others, without a word. Without one, or if nothing
    stopped it, the lowest surviving rank says which ranks were lost.
    """
    supervised = _supervisor_fd() is not None
    left()  # this rank leaves as its peers do, not lost: its supervisor must not end the job too
    if supervised:
        if threading.current_thread() is threading.main_thread():
            for signum in (*interrupts.STOPS, interrupts.RELAYED_STOP):
                signal.signal(signum, signal.SIG_DFL)  # stopped with the job: no "interrupted" line
        time.sleep(setting("HEARTBEAT_TIMEOUT"))
    if rank == min(set(range(size)) - set(failed)):
        ranks = ", ".join(map(str, failed))
        print(f"pydra: rank{'s' if len(failed) > 1 else ''} {ranks} lost during start-up, "
              f"{STEPS.get(label, 'in a start-up collective')}; ending the job", file=sys.stderr, flush=True)
