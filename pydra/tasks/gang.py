"""Gang (SPMD) tasks: one task run on several ranks at once, talking over MPI."""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from pydra.tasks.base import Task


class GangTask(Task):
    """A task that runs on :attr:`ranks` worker ranks at the same time.

    While :meth:`work` runs, :attr:`comm` is an ``mpi4py`` intracommunicator
    over exactly those ranks, so user code can call any collective on it, in
    object form (``comm.allreduce(x)``) or buffer form
    (``comm.Allreduce(a, b)`` with numpy arrays). The gang's result is what
    its rank 0 (``comm.rank == 0``) returns.

    Example::

        class Norm(pydra.GangTask):
            ranks = 2
            def work(self, n):
                part = np.arange(self.comm.rank, n, self.comm.size, dtype=float)
                return math.sqrt(self.comm.allreduce(float(part @ part)))
    """

    is_serial = False
    #: how many worker ranks the gang needs; None means every worker.
    ranks: int | None = None
    #: the gang's communicator, set on each member while :meth:`work` runs.
    comm: MPI.Intracomm | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A communicator is local to a process and never travels.
        state = self.__dict__.copy()
        state.pop("comm", None)
        return state
