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
from typing import Any

from mpi4py import MPI

from pydra.comm import mpi, seal, serial

# Alltoallv counts and displacements are C ints.
_MAX_BYTES = 2**31 - 1
#: the label that binds a sealed bucket to the shuffle
SHUFFLE = "shuffle"
#: a payload starts with the pickle's size and the number of out-of-band buffers, then their sizes
_HEAD = struct.Struct("<QI")


def exchange(comm: MPI.Intracomm, buckets: list[Any]) -> list[Any]:
    """Send ``buckets[i]`` to member *i*; return what each member sent here, by member."""
    if len(buckets) != comm.size:
        raise ValueError(f"expected {comm.size} buckets, one per member, got {len(buckets)}")
    import numpy as np  # here, not at the top: a run without a MapReduce never loads it

    sealer = seal.current()
    payloads = [_pack(bucket) for bucket in buckets]
    if sealer.enabled:  # once per shuffle, not per bucket
        world = mpi.world_ranks(comm)
        payloads = [[sealer.seal(b"".join(pieces), world[member], SHUFFLE)] for member, pieces in enumerate(payloads)]
    send_counts = np.array([sum(len(piece) for piece in pieces) for pieces in payloads], dtype=np.int64)
    if send_counts.sum() > _MAX_BYTES:
        raise ValueError(f"shuffle sends {send_counts.sum()} bytes from one rank; the limit is {_MAX_BYTES}")
    recv_counts = np.empty(comm.size, dtype=np.int64)
    comm.Alltoall(send_counts, recv_counts)
    if recv_counts.sum() > _MAX_BYTES:
        raise ValueError(f"shuffle receives {recv_counts.sum()} bytes on one rank; the limit is {_MAX_BYTES}")

    send_counts32 = send_counts.astype(np.int32)
    recv_counts32 = recv_counts.astype(np.int32)
    send_displs = np.concatenate(([0], np.cumsum(send_counts32)[:-1])).astype(np.int32)
    recv_displs = np.concatenate(([0], np.cumsum(recv_counts32)[:-1])).astype(np.int32)
    send_buffer = np.frombuffer(b"".join(piece for pieces in payloads for piece in pieces), dtype=np.uint8)
    recv_buffer = np.empty(int(recv_counts.sum()), dtype=np.uint8)
    comm.Alltoallv(
        [send_buffer, (send_counts32, send_displs), MPI.BYTE],
        [recv_buffer, (recv_counts32, recv_displs), MPI.BYTE],
    )
    parts = [recv_buffer[start : start + count] for start, count in zip(recv_displs.tolist(), recv_counts32.tolist())]
    if sealer.enabled:
        parts = [mpi.open_sealed(part, world[member], SHUFFLE) for member, part in enumerate(parts)]
    return [_unpack(memoryview(part)) for part in parts]


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
