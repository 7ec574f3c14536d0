"""The collective start of a Pydra session, and the rule that no rank may hang.

Every rank enters a session together (``with pydra.Executor()``,
``pydra.run``). Rank 0 gets a running :class:`Master`; the others serve it
until it says stop. From then on an uncaught exception anywhere aborts the
whole MPI job, since the other ranks would otherwise wait forever for a peer
that is gone.
"""

from __future__ import annotations

import socket
import sys
import threading
import traceback

from mpi4py import MPI

from pydra._core.master import Master
from pydra._core.worker import WorkerLoop
from pydra.comm import mpi
from pydra.config import flag, setting


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
    abort_on_uncaught_exceptions(comm)
    hosts = mpi.gather_object(comm, host_name(), 0, "gather-hosts", refused="?")
    # A heartbeat thread calls MPI while the main thread may be in user code (even in MPI).
    heartbeat = setting("HEARTBEAT", 0.5) if MPI.Query_thread() == MPI.THREAD_MULTIPLE else None
    if comm.rank != 0:
        WorkerLoop(comm, host_name(), heartbeat, isolate=setting("ISOLATE", False, flag)).serve()
        return None
    master = Master(comm, hosts, heartbeats=heartbeat is not None)
    master.start()
    return master


_installed = False


def abort_on_uncaught_exceptions(comm: MPI.Intracomm) -> None:
    """Make an uncaught exception on any thread of this rank abort the MPI job."""
    global _installed
    if _installed or comm.size == 1:
        return
    _installed = True
    where = f"rank {comm.rank} of {comm.size} on {host_name()}"

    def abort(kind: str, text: str) -> None:
        mpi.abort(comm, f"pydra: uncaught {kind} on {where}; aborting the MPI job\n{text}")

    def excepthook(exc_type, exc, tb) -> None:
        abort("exception", "".join(traceback.format_exception(exc_type, exc, tb)))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        abort(f"exception in thread {args.thread.name if args.thread else '?'}", text)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
