"""TARGETs for the sealing tests (tests/core/test_sealing.py), run with ``pydra run`` and a job key.

    PYDRA_JOB_KEY=... mpiexec -n 3 python -m pydra run tests/core/jobs/sealed_targets.py:forgeries MARKER
    PYDRA_SEAL=1 pydra run -n 3 tests/core/jobs/sealed_targets.py:workloads 0 1 2 ...

``forgeries`` has every worker, from inside a task, send rank 0 messages a
rank's own code could send behind Pydra's back (with mpi4py on
``COMM_WORLD``): a raw pickle that would create MARKER when unpickled, an
altered copy of a sealed reply, a replay of a genuine reply recorded off the
wire, a replayed log record and a sealed log record passed off as a reply.
``part_forgeries`` does the same with messages that carry out-of-band parts
(a large array): a part altered, a part of another message, a part of the
wrong size, and a replay of a genuine reply with a part. Either job must
finish as if none of them had been sent.
"""

from __future__ import annotations

import builtins
import os
import pickle
import time

import numpy as np
from mpi4py import MPI

import pydra
from pydra._core import protocol
from pydra._core.protocol import Tag
from pydra.comm import mpi, seal, serial

#: the MPI messages of each TAG_REPLIES message this process sent, once Tap has run here
WIRE: list[list[bytes]] = []


class Exploit:
    """Unpickling this opens (creates) a file: the proof that a pickle from the network ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


class Tap(pydra.GangTask):
    """On every worker: record the bytes this rank sends with TAG_REPLIES, as a wiretap would."""

    ranks = None

    def work(self, marker):
        put = mpi._put  # what the sealed send hands to MPI: the MPI messages on the wire

        def tap(comm, messages, dest, tag):
            if tag == Tag.REPLIES:
                WIRE.append([bytes(message) for message in messages])
            put(comm, messages, dest, tag)

        mpi._put = tap
        return marker


class Forge(pydra.GangTask):
    """On every worker: send rank 0 forged, altered and replayed messages, then carry on."""

    ranks = None

    def work(self, marker):
        world = MPI.COMM_WORLD
        world.Send([pickle.dumps([Exploit(marker)], 5), MPI.BYTE], 0, Tag.REPLIES)
        sealer = seal.current()
        if sealer.enabled:
            genuine = sealer.seal(protocol.encode_replies(0, [(10**9, True, serial.dumps("forged"), 0.0, ())])[0], 0,
                                  Tag.REPLIES)
            altered = bytearray(genuine)
            altered[len(altered) // 2] ^= 0x01
            world.Send([altered, MPI.BYTE], 0, Tag.REPLIES)
            world.Send([WIRE[-1][0], MPI.BYTE], 0, Tag.REPLIES)  # Tap's own reply, again
            record = protocol.LogRecord(None, time.time(), "WARNING", "forge", "sealed note")
            note = sealer.seal(protocol.encode(record), 0, Tag.LOG)
            world.Send([note, MPI.BYTE], 0, Tag.LOG)  # genuine: accepted
            world.Send([note, MPI.BYTE], 0, Tag.LOG)  # replayed
            world.Send([note, MPI.BYTE], 0, Tag.REPLIES)  # sealed as a log record, sent as a reply
        return list(range(20))


class Large(pydra.GangTask):
    """Every worker: gang rank 0 returns an array large enough to travel out of band (Tap records that reply)."""

    ranks = None

    def work(self, marker):
        return (marker, np.arange(1 << 15, dtype=np.float64)) if self.comm.rank == 0 else None


class ForgeParts(pydra.GangTask):
    """On every worker: send rank 0 messages whose out-of-band parts were altered, swapped, resized or replayed.

    Each forged first MPI message is genuinely sealed and names a pickle
    that would create MARKER when unpickled; only its parts are wrong.
    """

    ranks = None

    def work(self, previous):
        marker, array = previous
        world = MPI.COMM_WORLD

        def framed(value):
            """The MPI messages of a sealed reply carrying *value*, as the worker's own send makes them."""
            blob, buffers = protocol.pack_value(value)
            payload, buffers = protocol.encode_replies(0, [(10**9, True, blob, 0.0, buffers)])
            return mpi._sealed_wire(payload, buffers, 0, Tag.REPLIES)

        def send(*messages):
            for message in messages:
                world.Send([message, MPI.BYTE], 0, Tag.REPLIES)

        header, part = framed([Exploit(marker), array])
        altered = bytearray(part)
        altered[len(altered) // 2] ^= 0x01
        send(header, altered)  # a part altered on the wire
        header, _ = framed([Exploit(marker), array])
        _, other = framed([Exploit(marker), array + 1])
        send(header, other)  # the part of another message
        header, part = framed([Exploit(marker), array])
        send(header, bytes(part) + b"longer")  # a part of another size than its header names
        for messages in WIRE:
            if len(messages) > 1:  # a genuine reply with a part, recorded by Tap, sent again
                send(*messages)
        return list(range(20))


def part_forgeries():
    """Tap, Large, ForgeParts, then a Parallel that must still give the right answer: [0, 1, 4, ..., 361]."""
    return pydra.Sequence(Tap(), Large(), ForgeParts(), pydra.Parallel(Square(), chunksize=1))


class Square(pydra.Task):
    def work(self, x):
        return int(x) ** 2


def forgeries():
    """Tap, Forge, then a Parallel that must still give the right answer: [0, 1, 4, ..., 361]."""
    return pydra.Sequence(Tap(), Forge(), pydra.Parallel(Square(), chunksize=1))


class Buckets(pydra.MapReduce):
    """Squares by residue mod 7: every pair crosses the shuffle (no combiner)."""

    def map(self, x):
        yield x % 7, x

    def reduce(self, key, values):
        return sorted(values)


class Summary(pydra.GangTask):
    """Every worker sums its share of the buckets; a buffer Allreduce adds them up."""

    ranks = None

    def work(self, buckets):
        keys = sorted(buckets)
        mine = sum(sum(buckets[key]) for key in keys[self.comm.rank :: self.comm.size])
        total = np.zeros(1, dtype=np.int64)
        self.comm.Allreduce(np.array([mine], dtype=np.int64), total, op=MPI.SUM)
        return {"buckets": {str(key): buckets[key] for key in keys}, "total": int(total[0]), "gang": self.comm.size}


def workloads():
    """Parallel (one item per unit), MapReduce (the shuffle) and a GangTask, in one tree."""
    return pydra.Sequence(pydra.Parallel(Square(), chunksize=1), Buckets(), Summary())


class Probe(pydra.Task):
    """Where it ran, whether that rank seals, and whether the key is still in its environment."""

    def work(self, item):
        return {"rank": MPI.COMM_WORLD.rank, "sealed": seal.current().enabled, "key_in_env": "PYDRA_JOB_KEY" in os.environ}


def probes():
    return pydra.Parallel(Probe(), chunksize=1)
