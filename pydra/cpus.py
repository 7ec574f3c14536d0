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
they are all left as they are: the user chose. A CPU quota (cgroup v1's
``cpu.cfs_quota_us``, v2's ``cpu.max``: a container started with
``--cpus 4``, a systemd ``CPUQuota``) caps the cores a rank may use, rounded
up, though its affinity still shows every core of the host.

Task processes (``PYDRA_ISOLATE``) inherit the variables. A program that
runs its own ``Executor`` under mpiexec has loaded numpy before Pydra could
say anything: it sets the variables itself (README, "API by example").
"""

from __future__ import annotations

import hashlib
import math
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
    usable = min(len(cpus), quota() or len(cpus))
    os.environ.update(variables(os.environ, setting("THREADS"), threads(usable, keys, comm.rank)))


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


def quota(cgroups: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo") -> int | None:
    """The CPUs a CPU quota lets this process use, rounded up, or None if none applies.

    Cgroup v1 or v2; the least quota of the process's cgroup and its
    ancestors. A system without cgroups, or files that do not read as
    expected, count as no quota: this only ever lowers a thread count.
    """
    try:
        with open(cgroups) as handle:
            memberships = [line.rstrip("\n").split(":", 2) for line in handle if line.count(":") >= 2]
        with open(mountinfo) as handle:
            mounts = [line.split() for line in handle if " - " in line]
        limits: list[float] = []
        for _, controllers, path in memberships:
            for mount in mounts:
                kind, options = mount[mount.index("-") + 1], mount[mount.index("-") + 3].split(",")
                v2 = kind == "cgroup2" and controllers == ""
                if v2 or (kind == "cgroup" and "cpu" in controllers.split(",") and "cpu" in options):
                    limits += _limits(mount[4], mount[3], path, v2)
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None
    return math.ceil(min(limits)) if limits else None


def _limits(point: str, root: str, path: str, v2: bool) -> list[float]:
    """The quotas, in CPUs, of cgroup *path* and its ancestors, in a hierarchy whose *root* is mounted at *point*."""
    inside = os.path.relpath(path, root) if path == root or path.startswith(root.rstrip("/") + "/") else "."
    directory, found = os.path.normpath(os.path.join(point, inside)), []
    while True:
        limit = _v2_limit(directory) if v2 else _v1_limit(directory)
        if limit is not None:
            found.append(limit)
        if len(directory) <= len(os.path.normpath(point)):
            return found
        directory = os.path.dirname(directory)


def _v2_limit(directory: str) -> float | None:
    """``cpu.max``: ``max PERIOD`` (no quota) or ``QUOTA PERIOD`` in microseconds."""
    text = _read(os.path.join(directory, "cpu.max"))
    if not text or text.split()[0] == "max":
        return None
    quota_us, period_us = text.split()
    return int(quota_us) / int(period_us)


def _v1_limit(directory: str) -> float | None:
    """``cpu.cfs_quota_us`` (-1: no quota) over ``cpu.cfs_period_us``."""
    quota_us, period_us = (_read(os.path.join(directory, name)) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    if quota_us is None or period_us is None or int(quota_us) <= 0:
        return None
    return int(quota_us) / int(period_us)


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None
