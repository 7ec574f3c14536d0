"""All-to-all exchange of Python objects between the members of a communicator.

This is the MapReduce shuffle: every member holds one bucket per member and
receives, from every member, the bucket meant for it. Buckets are pickled
here and moved with two collectives, ``Alltoall`` for the byte counts and
``Alltoallv`` for the bytes themselves, so intermediate data flows directly
between workers and never through rank 0.

Large buffers a bucket's values expose to pickle protocol 5 (numpy arrays'
data; :func:`pydra.comm.serial.dumps_oob` decides which) travel out of band:
after the pickle in the bucket's payload, not copied into it, and each is
copied once out of the received bytes into memory of its own (writable, and
not pinning the whole exchange). A ``PYDRA_SERIALIZER`` without out-of-band
buffers keeps everything in its one pickle.

When the job seals (:mod:`pydra.comm.seal`), each bucket is sealed for its
receiver's world rank under the label ``"shuffle"``; one that does not open
is logged and fails this member's reduce with :class:`SealError` (dropping
it would silently lose keys).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

from mpi4py import MPI

from pydra.comm import mpi, seal, serial

# Alltoallv counts and displacements are C ints.
_MAX_BYTES = 2**31 - 1
#: the label that binds a sealed bucket to the shuffle
SHUFFLE = "shuffle"
#: a payload starts with the pickle's size and the number of out-of-band buffers, then their sizes
_HEAD = struct.Struct("<QI")


def exchange(comm: MPI.Intracomm, buckets: list[Any], copy_own: bool = True) -> list[Any]:
    """Send ``buckets[i]`` to member *i*; return what each member sent here, by member.

    What comes back is a copy, as if it had crossed the wire, even this
    member's own bucket; with *copy_own* false that one is returned as it is,
    not pickled at all (half of a two-member shuffle's pickling), for a caller
    that changes neither it nor the values in it.
    """
    if len(buckets) != comm.size:
        raise ValueError(f"expected {comm.size} buckets, one per member, got {len(buckets)}")
    sealer = seal.current()
    own = None if copy_own else comm.rank
    payloads = [[] if member == own else _pack(bucket) for member, bucket in enumerate(buckets)]
    if sealer.enabled:  # once per shuffle, not per bucket
        world = mpi.world_ranks(comm)
        payloads = [pieces if member == own else [sealer.seal(b"".join(pieces), world[member], SHUFFLE)]
                    for member, pieces in enumerate(payloads)]
    # Byte counts in array.array, not numpy: a worker that never imported numpy would pay its
    # import (a tenth of a second) here, on every member at once, inside the job.
    send_counts = array("q", [sum(len(piece) for piece in pieces) for pieces in payloads])
    if sum(send_counts) > _MAX_BYTES:
        raise ValueError(f"shuffle sends {sum(send_counts)} bytes from one rank; the limit is {_MAX_BYTES}")
    recv_counts = array("q", bytes(8 * comm.size))
    comm.Alltoall([send_counts, MPI.INT64_T], [recv_counts, MPI.INT64_T])
    if sum(recv_counts) > _MAX_BYTES:
        raise ValueError(f"shuffle receives {sum(recv_counts)} bytes on one rank; the limit is {_MAX_BYTES}")
    send_displs, recv_displs = _starts(send_counts), _starts(recv_counts)
    send_buffer = b"".join(piece for pieces in payloads for piece in pieces)
    recv_buffer = bytearray(sum(recv_counts))
    comm.Alltoallv(
        [send_buffer, (list(send_counts), send_displs), MPI.BYTE],
        [recv_buffer, (list(recv_counts), recv_displs), MPI.BYTE],
    )
    view = memoryview(recv_buffer)
    parts = [view[start : start + count] for start, count in zip(recv_displs, recv_counts)]
    if sealer.enabled:
        parts = [part if member == own else mpi.open_sealed(part, world[member], SHUFFLE)
                 for member, part in enumerate(parts)]
    return [buckets[member] if member == own else _unpack(memoryview(part)) for member, part in enumerate(parts)]


def _starts(counts: array) -> list[int]:
    """Where each of *counts* bytes starts, laid end to end (Alltoallv's displacements)."""
    starts, at = [], 0
    for count in counts:
        starts.append(at)
        at += count
    return starts


def _pack(bucket: Any) -> list[bytes | memoryview]:
    """*bucket* as the pieces of one payload: head and sizes, the pickle, then the buffers it left out of band."""
    data, buffers = serial.dumps_oob(bucket)  # (a serializer without out-of-band buffers keeps them in band)
    raws = [buffer.raw() for buffer in buffers]
    sizes = [raw.nbytes for raw in raws]
    return [_HEAD.pack(len(data), len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes), data, *raws]


def _unpack(payload: memoryview) -> Any:
    """The bucket of a payload made by :func:`_pack`."""
    size, count = _HEAD.unpack_from(payload)
    at = _HEAD.size + 8 * count
    data = payload[at : at + size]
    if not count:
        return serial.loads(data)
    buffers = []
    at += size
    for length in struct.unpack_from(f"<{count}Q", payload, _HEAD.size):
        buffers.append(bytearray(payload[at : at + length]))
        at += length
    return serial.loads(data, buffers=buffers)
