"""How a rank learns that peers failed, and how a job ends without MPI_Finalize.

Under ULFM (Open MPI started ``--with-ft ulfm``) MPI reports a dead peer as
an error of the call that needed it (:func:`peer_failed`,
:class:`RanksFailed`); elsewhere a rank learns of deaths from supervisors
and heartbeats. Either way, once a rank of the job is gone MPI_Finalize would
wait for it forever, so the survivors leave without it
(:func:`exit_without_finalize`, :func:`end_job_after_loss`), and an internal
error ends the whole job with one message (:func:`abort`).
"""

from __future__ import annotations

import os
import sys
import time

from mpi4py import MPI


#: MPI error classes saying that a peer process failed (ULFM: Open MPI started ``--with-ft ulfm``); an
#: MPI without them (MPICH) leaves mpi4py's names at ERR_UNKNOWN, which says nothing of the kind
_PEER_FAILED = {getattr(MPI, name) for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                if hasattr(MPI, name)} - {MPI.ERR_UNKNOWN}


class RanksFailed(Exception):
    """MPI reported that these ranks of the communicator failed (their processes died)."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"MPI reports that ranks {ranks} failed")
        self.ranks = ranks


def peer_failed(error: BaseException) -> bool:
    """Whether *error* is MPI saying that a peer process failed, rather than a fault of this call."""
    return isinstance(error, MPI.Exception) and error.Get_error_class() in _PEER_FAILED


def ulfm(comm: MPI.Comm) -> bool:
    """Whether MPI reports failed peers on *comm* (Open MPI started ``--with-ft ulfm``)."""
    return os.environ.get("OMPI_MCA_mpi_ft_enable") == "1" and hasattr(comm, "Ack_failed")


def failed_ranks(comm: MPI.Comm) -> list[int]:
    """Acknowledge the failures MPI knows of on *comm* (receives from any source work again); their ranks."""
    comm.Ack_failed()
    failed = comm.Get_failed()
    return sorted(MPI.Group.Translate_ranks(failed, list(range(failed.Get_size())), comm.Get_group()))


def abort(comm: MPI.Comm, message: str) -> None:
    """Print *message* to stderr and abort the whole MPI job (never returns)."""
    os.write(2, message.encode())
    _ending_on_purpose()
    # The launcher forwards stderr asynchronously and stops once the job is aborted:
    # give it a moment, or the one message saying why would be lost.
    time.sleep(0.5)
    comm.Abort(1)


def end_job_after_loss(comm: MPI.Comm, status: int, stuck: list[int]) -> None:
    """Rank 0, after ranks were lost: end the whole MPI job with *status* (never returns).

    MPI_Finalize would wait for the lost ranks forever, so rank 0 leaves
    without it, as the healthy workers (told to exit first) do. A lost rank
    is dead, or was told to stop too and exits once it reads that, or gives
    up when rank 0 falls silent; but one blocked in a collective with a dead
    rank (*stuck*) never runs again, and only MPI_Abort stops it. MPI_Abort
    is kept for that case alone: launchers report an aborted job as failed
    whatever its status (Slurm's srun kills the step: exit 137).
    """
    if not stuck:
        exit_without_finalize(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    time.sleep(0.3)  # let the healthy workers' exits (and their last output) through
    _ending_on_purpose()
    comm.Abort(status)


def exit_without_finalize(status: int) -> None:
    """End this process now, skipping MPI_Finalize (never returns).

    Once a rank of the job has died, MPI_Finalize would wait for it forever;
    the survivors flush what they printed and leave without it.
    """
    _ending_on_purpose()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _ending_on_purpose() -> None:
    """Tell this rank's supervisor (if any) that the end coming is Pydra's doing: its status is this rank's own."""
    from pydra import startup

    startup.left()  # (a rank that ends in its session without saying so was lost, see pydra.launcher.supervise)
