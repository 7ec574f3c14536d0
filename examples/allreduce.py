"""A gang task: the same code on several ranks at once, with numpy collectives.

    pydra run -n 4 examples/allreduce.py:Norm 1000000
    mpiexec -n 4 python examples/allreduce.py        # the same through pydra.run

The gang gets `self.comm`, an mpi4py communicator over exactly its ranks.
Each member squares its share of 1..n and the members add their partial sums
with a buffer-form Allreduce; the result is the Euclidean norm of 1..n.
"""

import math

import numpy as np
from mpi4py import MPI

import pydra


class Norm(pydra.GangTask):
    ranks = None  # every worker; set a number to use fewer

    def work(self, n="1000"):
        comm = self.comm
        mine = np.arange(1 + comm.rank, int(n) + 1, comm.size, dtype=np.float64)
        partial = np.array([mine @ mine])
        total = np.empty(1)
        comm.Allreduce(partial, total, op=MPI.SUM)
        return math.sqrt(total[0])


if __name__ == "__main__":
    norm = pydra.run(Norm(), "1000000")
    if norm is not None:  # rank 0
        print(f"|1..1000000| = {norm:.6e} (exact {math.sqrt(1_000_000 * 1_000_001 * 2_000_001 / 6):.6e})")
