"""MapReduce: map items to (key, value) pairs, shuffle them between workers, reduce per key.

Rank 0 only hands out map work and collects the final dict; the intermediate
pairs stay on the workers that produced them until the shuffle, a collective
exchange among those workers (:mod:`pydra.comm.shuffle`).
"""

from __future__ import annotations

import numbers
import pickle
import struct
import zlib
from array import array
from typing import Any, Hashable, Iterable

from mpi4py import MPI

from pydra.comm.shuffle import exchange
from pydra.tasks.containers import OverItems

# Pairs buffered on one rank before the combiner folds them again.
_COMBINE_EVERY = 100_000


class MapReduce(OverItems):
    """Subclass and define :meth:`map` and :meth:`reduce` (and optionally :meth:`combine`).

    The result is a dict ``{key: reduce(key, values)}``. Keys must partition
    the same way on every rank: str, bytes, numbers, None and tuples or
    frozensets of those do; other keys are partitioned by their pickle.

    Example::

        class WordCount(pydra.MapReduce):
            def map(self, line):
                for word in line.split():
                    yield word, 1
            def combine(self, word, counts):
                return sum(counts)
            def reduce(self, word, counts):
                return sum(counts)
    """

    def map(self, item: Any) -> Iterable[tuple[Hashable, Any]]:
        """Yield the (key, value) pairs of one item. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override map()")

    def combine(self, key: Hashable, values: list[Any]) -> Any:
        """Optional: fold some of a key's values into one, on the mapping rank.

        Define it when it is cheaper to ship one partial result than many
        values; it must return a value that :meth:`reduce` (and a later
        combine) accepts among the others.
        """
        raise NotImplementedError

    def reduce(self, key: Hashable, values: list[Any]) -> Any:
        """Return the result for *key* from all its values. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override reduce()")

    @property
    def has_combine(self) -> bool:
        """Whether the subclass defines a combiner."""
        return type(self).combine is not MapReduce.combine


def stable_hash(key: Hashable) -> int:
    """A hash equal on every rank for equal keys (Python's ``hash(str)`` is salted per process)."""
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, bytes):
        return zlib.crc32(key)
    if isinstance(key, numbers.Integral):  # bool and numpy integers too: True == 1 == np.int64(1)
        return int(key) & 0xFFFFFFFF
    if isinstance(key, numbers.Real):
        value = float(key)
        if value.is_integer():  # 2.0 == 2 must land with 2
            return int(value) & 0xFFFFFFFF
        return zlib.crc32(struct.pack("<d", value))
    if isinstance(key, tuple):
        combined = 0x345678
        for element in key:
            combined = zlib.crc32(combined.to_bytes(4, "little"), stable_hash(element))
        return combined
    if isinstance(key, frozenset):
        combined = 0
        for element in key:  # iteration order differs between processes; xor does not care
            combined ^= stable_hash(element)
        return combined
    return zlib.crc32(pickle.dumps(key, 5))


class MapBuffer:
    """The pairs one rank's map units produced for one MapReduce, held until the shuffle."""

    def __init__(self, job: MapReduce) -> None:
        self.job = job
        self.values: dict[Hashable, list[Any]] = {}
        self._since_combine = 0

    def add(self, items: Iterable[Any]) -> int:
        """Map *items* into the buffer; return how many pairs they produced.

        All or nothing: if the map raises, the buffer is as it was, so the
        items can be tried again without counting any pair twice.
        """
        pairs = [pair for item in items for pair in self.job.map(item)]
        values = self.values
        for key, value in pairs:
            bucket = values.get(key)
            if bucket is None:
                values[key] = [value]
            else:
                bucket.append(value)
        produced = len(pairs)
        self._since_combine += produced
        if self._since_combine >= _COMBINE_EVERY:
            self.combine()
        return produced

    def merge(self, values: dict[Hashable, list[Any]]) -> None:
        """Take in pairs mapped elsewhere (by an isolated worker's child process)."""
        for key, more in values.items():
            bucket = self.values.get(key)
            if bucket is None:
                self.values[key] = more
            else:
                bucket.extend(more)
            self._since_combine += len(more)
        if self._since_combine >= _COMBINE_EVERY:
            self.combine()

    def combine(self) -> None:
        """Fold each key's values with the job's combiner, if it has one."""
        self._since_combine = 0
        if not self.job.has_combine:
            return
        combine = self.job.combine
        for key, values in self.values.items():
            if len(values) > 1:
                self.values[key] = [combine(key, values)]

    def partitions(self, count: int) -> list[dict[Hashable, list[Any]]]:
        """Split the pairs into *count* dicts by :func:`stable_hash` of the key."""
        parts: list[dict[Hashable, list[Any]]] = [{} for _ in range(count)]
        for key, values in self.values.items():
            parts[stable_hash(key) % count][key] = values
        return parts


def shuffle_and_reduce(buffer: MapBuffer, comm: MPI.Intracomm) -> dict[Hashable, Any]:
    """Collective over *comm*: exchange partitions, then reduce the keys that landed here.

    The members first agree that every one of them is ready; if a combiner
    failed on one rank, the others skip the exchange instead of waiting in it
    forever, and only the failing rank reports an error.
    """
    try:
        buffer.combine()
        parts = buffer.partitions(comm.size)
    except BaseException:
        _all_ready(comm, False)
        raise
    if not _all_ready(comm, True):
        return {}
    merged: dict[Hashable, list[Any]] = {}
    for part in exchange(comm, parts):
        for key, values in part.items():
            bucket = merged.get(key)
            if bucket is None:
                merged[key] = values
            else:
                bucket.extend(values)
    reduce = buffer.job.reduce
    return {key: reduce(key, values) for key, values in merged.items()}


def _all_ready(comm: MPI.Intracomm, ready: bool) -> bool:
    """Collective: whether every member is *ready*.

    A buffer ``Allreduce`` of one C int: no pickle crosses ranks (mpi4py's
    lowercase ``allreduce`` would send one), so there is nothing to seal.
    """
    flag = array("i", [int(ready)])
    comm.Allreduce(MPI.IN_PLACE, [flag, MPI.INT], op=MPI.LAND)
    return bool(flag[0])
