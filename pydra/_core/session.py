"""The collective start of a Pydra session, and the rule that no rank may hang.

Every rank enters a session together (``with pydra.Executor()``,
``pydra.run``). Rank 0 gets a running :class:`Master`; the others serve it
until it says stop.

A rank that ends with an uncaught exception while its peers wait for it in
some collective would leave them waiting forever (and itself, in
MPI_Finalize), so from the first session on such an exit aborts the whole
MPI job. Nothing else does: no exception hook is replaced, so
``sys.excepthook`` called by IPython or a logger, or an exception in a
thread of the user's, is printed as usual. Pydra's own threads abort the job
if they fail, since a rank would then hang.
"""

from __future__ import annotations

import atexit
import socket
import sys
from typing import TYPE_CHECKING

from mpi4py import MPI

from pydra import startup
from pydra._core import protocol
from pydra.comm import failures, mpi, serial
from pydra.config import setting

if TYPE_CHECKING:
    from pydra._core.master import Master


def host_name() -> str:
    """The name this rank reports for its host."""
    return socket.gethostname()


def run_session(comm: MPI.Intracomm) -> Master | None:
    """Collective: on rank 0 start and return the master; elsewhere serve it, then return None.

    Raises :class:`~pydra.comm.seal.SealConfigError` on every rank if the
    job's sealing settings are unusable (see :func:`pydra.comm.mpi.start_sealing`).
    """
    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise RuntimeError("pydra needs MPI initialised with at least MPI_THREAD_SERIALIZED")
    mpi.start_sealing(comm)  # before any message, and before a bad setting could abort the job
    serial.use(setting("SERIALIZER"))
    mpi.TAG_NAMES.update(protocol.TAG_NAMES)  # for log lines about dropped messages
    abort_on_uncaught_exit(comm)
    hosts = mpi.gather_object(comm, host_name(), 0, "gather-hosts", refused="?")
    startup.joined()  # from here on, the heartbeats notice a lost rank
    # A heartbeat thread calls MPI while the main thread may be in user code (even in MPI).
    heartbeat = setting("HEARTBEAT") if MPI.Query_thread() == MPI.THREAD_MULTIPLE else None
    # Each side imports only its own half: a worker rank never loads the scheduler (nor asyncio).
    if comm.rank != 0:
        from pydra._core.worker import WorkerLoop

        WorkerLoop(comm, host_name(), heartbeat, isolate=setting("ISOLATE")).serve()
        startup.left()  # served to the end: how this rank ends from here on is its program's doing
        return None
    from pydra._core.master import Master

    master = Master(comm, hosts, heartbeats=heartbeat is not None)
    master.start()
    return master


_armed = False
_exiting: SystemExit | None = None  # see exiting_with


def exiting_with(error: SystemExit) -> None:
    """Rank 0 leaves a session with *error*, a ``sys.exit(code)`` (perhaps a task's, re-raised there).

    ``SystemExit`` leaves no ``sys.last_value``, so this is how the exit check
    knows that the process is about to end in error while the workers go on.
    """
    global _exiting
    if error.code not in (None, 0):
        _exiting = error


def abort_on_uncaught_exit(comm: MPI.Intracomm) -> None:
    """From now on, if this process ends with an uncaught exception, abort the MPI job (once per process).

    The check runs at interpreter exit, before MPI_Finalize: the interpreter
    has printed the traceback and set ``sys.last_value`` (or rank 0 saw a
    ``sys.exit(code)`` leave a session, :func:`exiting_with`). Interactive
    sessions are left alone (they set it for every error they show).
    """
    global _armed
    if _armed or comm.size == 1:
        return
    _armed = True
    where = f"rank {comm.rank} of {comm.size} on {host_name()}"

    def check() -> None:
        error = getattr(sys, "last_value", None) or _exiting
        if error is None or hasattr(sys, "ps1") or sys.flags.interactive:
            return
        failures.abort(comm, f"pydra: {where} ended with an uncaught {type(error).__name__}; aborting the MPI job"
                        " so that no rank waits for it\n")

    atexit.register(check)
