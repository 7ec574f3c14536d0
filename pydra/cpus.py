"""Each host's cores shared out among its ranks: how many threads numerical libraries may start in each.

numpy's OpenBLAS, MKL, OpenMP code and numexpr start, in every process that
loads them, one thread per core the process may run on. The ranks of one job
on one host would each start that many: 64 ranks on 64 cores would run 4,096
threads on 64 cores as soon as their tasks multiply matrices
(``benchmarks/threads.py`` measures what that costs on this machine; the
README has the figures). Dask's workers set the same variables to 1 for the
same reason; Pydra shares the cores out.

:func:`share_cores` runs on every rank of ``pydra run`` and ``pydra serve``
right after MPI starts, before a TARGET (whose imports load those libraries)
is loaded. It sets :data:`VARIABLES`, which the libraries read once, when
they load, to ``PYDRA_THREADS``: by default (``auto``) the cores this rank
may run on (its CPU affinity: all of the host's, unless the launcher bound
the ranks, or a batch system gave the job fewer) divided by the worker ranks
of this host that may run on the same cores. Rank 0 runs no task while it
has workers, so it takes no share. Ranks bound to cores of their own keep
them all; ranks whose CPU sets overlap without being the same are counted
apart (launchers do not bind so). If the user set any of the variables,
they are all left as they are: the user chose. A CPU quota is not an
affinity (a container started with ``--cpus 4`` still sees every core of
its host): there, set ``PYDRA_THREADS`` to the quota's share.

Task processes (``PYDRA_ISOLATE``) inherit the variables. A program that
runs its own ``Executor`` under mpiexec has loaded numpy before Pydra could
say anything: it sets the variables itself (README, "API by example").
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

#: what OpenMP, OpenBLAS, MKL, BLIS, numexpr and Apple's Accelerate read for their number of threads
VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def parse_threads(text: str) -> str | int:
    """``PYDRA_THREADS``: ``auto``, ``off`` or a positive number of threads."""
    if text in ("auto", "off"):
        return text
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def share_cores(comm: Any) -> None:
    """Collective over *comm*, before the TARGET loads: set this rank's :data:`VARIABLES` (see the module).

    Every rank takes part whatever its settings, so that the ranks agree on
    whether there is a collective at all.
    """
    from mpi4py import MPI

    from pydra.comm import mpi
    from pydra.config import setting

    cpus = _cpus()
    mine = _key(MPI.Get_processor_name(), cpus)
    keys = array("Q", bytes(8 * comm.size))
    mpi.wait(comm.Iallgather([array("Q", [mine]), MPI.UINT64_T], [keys, MPI.UINT64_T]), comm, "share-cores")
    os.environ.update(variables(os.environ, setting("THREADS"), threads(len(cpus), keys, comm.rank)))


def threads(cpus: int, keys: Sequence[int], rank: int) -> int:
    """*rank*'s share of its *cpus* among the worker ranks whose host and CPU set (``keys``) are its own."""
    sharing = sum(1 for other in range(1, len(keys)) if keys[other] == keys[rank])
    return max(1, cpus // max(1, sharing))


def variables(environ: Mapping[str, str], choice: str | int, share: int) -> dict[str, str]:
    """The variables to set, for ``PYDRA_THREADS`` *choice* and this rank's *share*: none if the user set any."""
    if choice == "off" or any(environ.get(name) for name in VARIABLES):
        return {}
    count = share if choice == "auto" else choice
    return {name: str(count) for name in VARIABLES}


def _cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the system cannot say)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # macOS
        return set(range(os.cpu_count() or 1))


def _key(host: str, cpus: set[int]) -> int:
    """One number for a host and a CPU set (equal for the ranks that share those cores)."""
    text = f"{host}\0{sorted(cpus)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")
