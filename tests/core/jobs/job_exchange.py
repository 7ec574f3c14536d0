"""The shuffle's exchange called directly, on every rank; see tests/core/test_mapreduce.py.

    mpiexec -n 3 python tests/core/jobs/job_exchange.py

Every rank sends each member a bucket naming both ends (a dict with a numpy
array, out of band, and a list), once copying its own bucket as if it had
crossed the wire and once not (``copy_own=False``), and reports per member
received: whether it is the very object this rank passed in and whether it
equals what that member sent. Rank 0 prints one ``RESULT`` line of JSON:
one report per rank. With ``PYDRA_JOB_KEY`` set the buckets are sealed.
"""

from __future__ import annotations

import json

import numpy as np
from mpi4py import MPI

from pydra.comm import mpi
from pydra.comm.shuffle import exchange


def bucket(sender: int, receiver: int) -> dict:
    return {"from": sender, "to": receiver, "data": np.full(100_000, sender * 10 + receiver), "list": [sender] * 3}


def same(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(
        np.array_equal(got[key], value) if isinstance(value, np.ndarray) else got[key] == value
        for key, value in expected.items()
    )


def report(comm: MPI.Intracomm, copy_own: bool) -> list[dict]:
    buckets = [bucket(comm.rank, member) for member in range(comm.size)]
    received = exchange(comm, buckets, copy_own=copy_own)
    return [{"identical": got is buckets[member], "equal": same(got, bucket(member, comm.rank))}
            for member, got in enumerate(received)]


if __name__ == "__main__":
    world = MPI.COMM_WORLD
    sealer = mpi.start_sealing(world)
    mine = {"sealed": sealer.enabled, "copied": report(world, True), "own-kept": report(world, False)}
    reports = world.gather(mine, 0)
    if world.rank == 0:
        print("RESULT " + json.dumps(reports), flush=True)
