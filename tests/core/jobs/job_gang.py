"""Gang tasks: every collective in object and numpy buffer form; see tests/core/test_gang.py.

    mpiexec -n 4 python tests/core/jobs/job_gang.py [CASE...]

Each member records what it received from every collective; the gang's
rank 0 gathers all members' records and returns them, so the test checks
every member against a serial computation.
"""

from __future__ import annotations

import core_jobkit
import numpy as np
from mpi4py import MPI

import pydra


def collectives(comm: MPI.Intracomm, tag: int) -> list[dict] | None:
    """Run every collective on *comm*; gang rank 0 gets every member's record."""
    r, s = comm.rank, comm.size
    got: dict = {"rank": r, "size": s, "world": MPI.COMM_WORLD.rank, "tag": tag}
    # object form
    got["allreduce"] = comm.allreduce(r + 1)
    got["reduce"] = comm.reduce(r + 1, op=MPI.PROD, root=0)
    got["bcast"] = comm.bcast({"k": [1, 2], "tag": tag} if r == 0 else None, root=0)
    got["gather"] = comm.gather(r * r, root=0)
    got["scatter"] = comm.scatter([i * 10 for i in range(s)] if r == 0 else None, root=0)
    got["alltoall"] = comm.alltoall([r * 100 + i for i in range(s)])
    got["allgather"] = comm.allgather(r)
    got["barrier"] = comm.barrier()
    # buffer form
    total = np.empty(4)
    comm.Allreduce(np.full(4, r + 1.0), total, op=MPI.SUM)
    got["Allreduce"] = total.tolist()
    largest = np.zeros(1, dtype=np.int64)
    comm.Reduce(np.array([r + 1], dtype=np.int64), largest if r == 0 else None, op=MPI.MAX, root=0)
    got["Reduce"] = largest.tolist() if r == 0 else None
    shared = np.arange(5) * 3.5 if r == 0 else np.empty(5)
    comm.Bcast(shared, root=0)
    got["Bcast"] = shared.tolist()
    table = np.empty((s, 2), dtype=np.int32) if r == 0 else None
    comm.Gather(np.array([r, r * r], dtype=np.int32), table, root=0)
    got["Gather"] = table.tolist() if r == 0 else None
    row = np.empty(3, dtype=np.int64)
    comm.Scatter(np.arange(s * 3, dtype=np.int64).reshape(s, 3) if r == 0 else None, row, root=0)
    got["Scatter"] = row.tolist()
    received = np.empty(s, dtype=np.int64)
    comm.Alltoall(np.arange(s, dtype=np.int64) * (r + 1), received)
    got["Alltoall"] = received.tolist()
    comm.Barrier()
    return comm.gather(got, root=0)


class Collectives(pydra.GangTask):
    """Every worker (ranks=None)."""

    def work(self, tag):
        return collectives(self.comm, tag)


class PairCollectives(pydra.GangTask):
    ranks = 2

    def work(self, tag):
        return collectives(self.comm, tag)


class Pair(pydra.GangTask):
    """A small gang: its size, its members' world ranks and a sum over it."""

    ranks = 2

    def work(self, x):
        comm = self.comm
        return {"x": x, "size": comm.size, "members": comm.allgather(MPI.COMM_WORLD.rank), "sum": comm.allreduce(x)}


class Solo(pydra.GangTask):
    """Gangs of one: several start in the same scheduling pass."""

    ranks = 1

    def work(self, x):
        return {"x": x, "size": self.comm.size, "world": MPI.COMM_WORLD.rank, "sum": self.comm.allreduce(x)}


class TooBig(pydra.GangTask):
    ranks = MPI.COMM_WORLD.size + 1  # more than any job's workers

    def work(self):
        return "should never run"


class AllFail(pydra.GangTask):
    def work(self, x):
        raise RuntimeError(f"gang member {self.comm.rank} gives up on {x}")


CASES = {
    "collectives_all_workers": lambda: pydra.run(Collectives(), 7),
    "collectives_ranks_2": lambda: pydra.run(PairCollectives(), 8),
    "gang_ranks_2_root": lambda: pydra.run(Pair(), 5),
    "gang_ranks_2_in_parallel": lambda: pydra.run(pydra.Parallel(Pair(), [1, 2, 3, 4, 5])),
    "solo_gangs_in_parallel": lambda: pydra.run(pydra.Parallel(Solo(), [1, 2, 3, 4, 5, 6])),
    "too_many_ranks": lambda: pydra.run(TooBig()),
    "after_too_many_ranks": lambda: pydra.run(Collectives(), 9),
    "all_members_fail": lambda: pydra.run(AllFail(), "x"),
}

if __name__ == "__main__":
    core_jobkit.main(CASES)
