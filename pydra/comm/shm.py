"""Large buffers between the ranks of one host through shared memory, where MPI would move them itself.

Between two processes of one host MPI moves a large buffer with a
rendezvous: the receiver matches the message, then copies it out of the
sender's memory through the kernel, page by page, and tells the sender it is
done (here, 1 MiB one way takes MPICH about 86 us, a plain ``memcpy`` of it
25 us). Pydra copies it once with ``memcpy`` instead: each rank owns an
*arena*, an anonymous shared memory file (``memfd``) of ``PYDRA_SHM_BYTES``
whose pages are taken from the kernel as they are first written, and every
rank of the host maps every other's once, at the start of the first session
(through ``/proc/PID/fd/FD``, which only the same user may open). A buffer on
its way to a rank of the host is copied into a free slot of the sender's
arena and named in the message by its offset; the receiver hands its reader
an array over the slot itself. The slot stays the reader's while any view of
it lives (the array's base is a ``ctypes`` object over the slot, and a weak
reference to it notes the offset when it dies); the offsets a rank is done
with ride on its next message to the arena's owner, who then reuses them.
Each side of a call still has its own copy: the sender may change its array
once the message is framed, and the receiver owns what it got.

A buffer that finds no free slot (the arena full of values the peer still
holds), any buffer to another host, and every buffer of a sealed job go as
MPI messages (:mod:`pydra.comm.mpi`). Nothing here calls MPI: the ranks agree
on who shares in :func:`pydra.comm.mpi.start_sealing`, from :func:`offer`
and :func:`accept`.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import weakref
from bisect import bisect
from collections import deque
from functools import partial
from typing import Any, Sequence

#: the first bytes of a message that names shared slots (never a pickle's: those start with 0x80)
MAGIC = b"\x00shared"
#: a part's offset when it goes as an MPI message of its own
BY_MPI = 2**64 - 1

_HEAD = struct.Struct(">II")  # parts, freed offsets
_PART = struct.Struct(">QQ")  # size, offset in the sender's arena (or BY_MPI)
_FREED = struct.Struct(">Q")  # an offset in the receiver's arena that the sender is done with
_RECORD = struct.Struct(">24sQQQQQ")  # host key, pid, fd, device, inode, size (0: no arena)
#: the size of one rank's record in the start-up exchange
RECORD_BYTES = _RECORD.size


def slot_size(nbytes: int) -> int:
    """The slot that holds *nbytes*: 64, 128, then 2**k or 3 * 2**(k-2) bytes (multiples of 64).

    Few sizes, so few ``ctypes`` array types (they are cached for good),
    at the cost of at most a third of a slot.
    """
    if nbytes <= 128:
        return 64 if nbytes <= 64 else 128
    power = 1 << (nbytes - 1).bit_length()
    three = power // 4 * 3
    return three if three >= nbytes else power


class Arena:
    """This rank's shared memory: slots of buffers on their way to ranks of its host (any thread)."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("pydra-buffers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._view = memoryview(mmap.mmap(self.fd, size))
        except OSError:
            os.close(self.fd)
            raise
        self._free: list[tuple[int, int]] = [(0, size)]  # (start, length), by start
        self._taken: dict[int, int] = {}  # start -> length
        self._lock = threading.Lock()

    def place(self, buffer: memoryview) -> int:
        """Copy *buffer* (flat bytes) into a free slot and return its offset, or :data:`BY_MPI` if none fits."""
        length = slot_size(buffer.nbytes)
        with self._lock:
            for index, (start, free) in enumerate(self._free):
                if free >= length:
                    break
            else:
                return BY_MPI
            if free == length:
                del self._free[index]
            else:
                self._free[index] = (start + length, free - length)
            self._taken[start] = length
        self._view[start : start + buffer.nbytes] = buffer  # outside the lock: the slot is this thread's
        return start

    def release(self, starts: Sequence[int]) -> None:
        """Take back the slots at *starts*, which their reader is done with (an offset not given out is ignored)."""
        with self._lock:
            for start in starts:
                length = self._taken.pop(start, None)
                if length is None:
                    continue
                free = self._free
                index = bisect(free, (start, 0))
                if index < len(free) and free[index][0] == start + length:  # joins the next free run
                    length += free.pop(index)[1]
                if index and free[index - 1][0] + free[index - 1][1] == start:  # and the one before
                    start, length = free[index - 1][0], free[index - 1][1] + length
                    index -= 1
                    del free[index]
                free.insert(index, (start, length))

    def statistics(self) -> dict[str, int]:
        """Bytes in slots given out and not yet back, and how many such slots."""
        with self._lock:
            return {"bytes_held": sum(self._taken.values()), "slots_held": len(self._taken)}


# -- this process's sharing (set once, by accept) -----------------------------------------------

_arena: Arena | None = None
#: world rank -> its arena, mapped here (the ranks this one shares with)
_mapped: dict[int, mmap.mmap] = {}
#: world rank -> offsets of its arena that this process is done with, to tell it in the next message
_freed: dict[int, deque[int]] = {}
#: (world rank, offset) -> a weak reference to the object that holds that slot of its arena here
_holders: dict[tuple[int, int], weakref.ref] = {}
_counts = {"shared": 0, "by_mpi": 0}  # buffers sent each way, for statistics()


def offer(size: int) -> bytes:
    """This rank's record for the start-up exchange: its host and its new arena of *size* bytes (none if 0)."""
    global _arena
    key = _host_key()
    none = _RECORD.pack(b"", 0, 0, 0, 0, 0)
    if size <= 0 or key is None or not hasattr(os, "memfd_create"):
        return none
    try:
        _arena = Arena(size)
    except OSError:  # memfd_create refused (a seccomp filter), no address space left (ulimit -v)...
        return none
    info = os.fstat(_arena.fd)
    return _RECORD.pack(key, os.getpid(), _arena.fd, info.st_dev, info.st_ino, size)


def accept(records: bytes, world: Sequence[int], me: int) -> bool:
    """Map the arena of every other member of this host, from the exchange's *records* (member order).

    *world* gives each member's world rank, *me* this one's member rank.
    False if one could not be mapped: then no rank may share (see :func:`stop`).
    """
    mine = _RECORD.unpack_from(records, me * RECORD_BYTES)
    if mine[5] == 0:
        return True
    for member, rank in enumerate(world):
        key, pid, fd, device, inode, size = _RECORD.unpack_from(records, member * RECORD_BYTES)
        if member == me or size == 0 or key != mine[0]:
            continue
        try:
            _mapped[rank] = _map(pid, fd, device, inode, size)
        except (OSError, ValueError):
            return False
        _freed[rank] = deque()
    return True


def stop() -> None:
    """Share nothing (a member could not map an arena): every buffer goes by MPI."""
    global _arena
    _mapped.clear()
    _freed.clear()
    if _arena is not None:
        os.close(_arena.fd)  # its memory goes with the last reference to it
    _arena = None


def _map(pid: int, fd: int, device: int, inode: int, size: int) -> mmap.mmap:
    """Map another process's arena, making sure the file is the one it named (not a reused pid's)."""
    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        info = os.fstat(handle)
        if (info.st_dev, info.st_ino, info.st_size) != (device, inode, size):
            raise ValueError("not the arena its record names")
        return mmap.mmap(handle, size)
    finally:
        os.close(handle)


def _host_key() -> bytes | None:
    """What ranks that can map each other's arenas share: the kernel's boot and the pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = bytes.fromhex(boot.read().strip().replace("-", ""))
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except (OSError, ValueError):
        return None
    return boot_id + namespace.to_bytes(8, "big")


def active() -> bool:
    """Whether this process shares buffers with any rank."""
    return bool(_mapped)


# -- the wire form ------------------------------------------------------------------------------
#
# MAGIC, then _HEAD (how many parts, how many freed offsets), each part's (size, offset) in the
# sender's arena (BY_MPI: it follows as an MPI message, in order), the freed offsets of the
# receiver's arena, then the pickle.


def frame(payload: bytes, buffers: Sequence, rank: int) -> list | None:
    """The MPI messages of a message to world rank *rank*: the first, then the parts that go by MPI.

    None if the plain wire form will do (no buffer to place and nothing freed
    to tell, or a rank this one does not share with).
    """
    freed = _freed.get(rank)
    if freed is None or not (buffers or freed):
        return None
    offsets: list[int] = []
    while True:
        try:
            offsets.append(freed.popleft())  # finalizers append from any thread
        except IndexError:
            break
    table, by_mpi = [], []
    for buffer in buffers:
        part = memoryview(buffer).cast("B")
        start = _arena.place(part)  # type: ignore[union-attr]  # _freed is filled only with an arena
        if start == BY_MPI:
            by_mpi.append(part)
        table.append(_PART.pack(part.nbytes, start))
    _counts["by_mpi"] += len(by_mpi)
    _counts["shared"] += len(buffers) - len(by_mpi)
    first = b"".join([MAGIC, _HEAD.pack(len(table), len(offsets)), *table, *map(_FREED.pack, offsets), payload])
    return [first, *by_mpi]


def unframe(first: bytes | bytearray, rank: int) -> tuple[memoryview, list]:
    """The pickle of a message from world rank *rank*, and its parts: a view of each shared one, the size of one by MPI.

    Takes back the slots of this rank's arena that the message says are free.
    Raises ``ValueError`` for a slot outside the sender's arena.
    """
    view = memoryview(first)
    parts, freed = _HEAD.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + _HEAD.size
    end = start + parts * _PART.size
    table = list(_PART.iter_unpack(view[start:end]))
    offsets = [offset for (offset,) in _FREED.iter_unpack(view[end : end + freed * _FREED.size])]
    if offsets and _arena is not None:
        _arena.release(offsets)
    entries = [size if offset == BY_MPI else _slot(rank, offset, size) for size, offset in table]
    return view[end + freed * _FREED.size :], entries


def _slot(rank: int, start: int, nbytes: int) -> Any:
    """A writable numpy byte array over a slot of *rank*'s arena, which goes back to *rank* when no view of it lives."""
    import ctypes  # both here, not at start-up: a job that sends no buffer needs neither
    import numpy

    memory = _mapped.get(rank)
    length = slot_size(nbytes)
    if memory is None or not 0 <= start <= start + length <= len(memory):
        raise ValueError(f"a shared slot at {start} that rank {rank}'s arena does not have")
    holder = (ctypes.c_char * length).from_buffer(memory, start)
    _holders[rank, start] = weakref.ref(holder, partial(_holder_gone, rank, start))
    return numpy.frombuffer(holder, numpy.uint8, nbytes)


def _holder_gone(rank: int, start: int, reference: weakref.ref) -> None:
    """The last view of a slot is gone (in any thread, whenever that was): note its offset for its owner."""
    del _holders[rank, start]
    _freed[rank].append(start)


def statistics() -> dict[str, int]:
    """This process's sharing: buffers sent through shared memory and by MPI, its arena's slots still held."""
    held = _arena.statistics() if _arena is not None else {"bytes_held": 0, "slots_held": 0}
    return {"peers": len(_mapped), **_counts, **held}
