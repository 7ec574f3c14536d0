"""MapReduce: map items to (key, value) pairs, shuffle them between workers, reduce per key.

Rank 0 only hands out map work and collects the final dict; the intermediate
pairs stay on the workers that produced them until the shuffle, a collective
exchange among those workers (:mod:`pydra.comm.shuffle`).
"""

from __future__ import annotations

import builtins
import numbers
import pickle
import struct
import zlib
from array import array
from collections.abc import Mapping
from typing import Any, Callable, Hashable, Iterable

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

    def map(self, item: Any) -> Iterable[tuple[Hashable, Any]] | Mapping[Hashable, Any]:
        """Yield the (key, value) pairs of one item, or return a mapping whose items are the pairs. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override map()")

    def combine(self, key: Hashable, values: list[Any]) -> Any:
        """Optional: fold some of a key's values into one, on the mapping rank.

        Define it when it is cheaper to ship one partial result than many
        values; it must return a value that :meth:`reduce` (and a later
        combine) accepts among the others. It may be given any part of a
        key's values, even one. Written exactly ``return sum(values)``, it
        is not called: each rank keeps a running total per key instead
        (:func:`sums_its_values`).
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


def _sum_of_values(self: Any, key: Hashable, values: list[Any]) -> Any:
    return sum(values)


def sums_its_values(method: Callable) -> bool:
    """Whether *method* is, to the bytecode, ``def combine(self, key, values): return sum(values)``.

    Such a combine is applied as the pairs come: a running ``total + value``
    per key, the very additions ``sum`` makes, without a list per key. (The
    names may differ; the ``sum`` the method sees must be the builtin.)
    """
    code, reference = getattr(method, "__code__", None), _sum_of_values.__code__
    if code is None or (code.co_code, code.co_names, code.co_argcount) != (reference.co_code, reference.co_names, 3):
        return False
    found = method.__globals__["sum"] if "sum" in method.__globals__ else method.__builtins__.get("sum")
    return found is builtins.sum


class MapBuffer:
    """The pairs one rank's map units produced for one MapReduce, held until the shuffle.

    ``values`` maps each key to the list of its values so far or, when the
    job's combine is a plain sum (:func:`sums_its_values`), to their running
    total: then a pair costs one dict update, and no list is built.
    """

    def __init__(self, job: MapReduce) -> None:
        self.job = job
        self.running = job.has_combine and sums_its_values(type(job).combine)
        self.values: dict[Hashable, Any] = {}
        self._since_combine = 0

    def add(self, items: Iterable[Any]) -> int:
        """Map *items* into the buffer; return how many keys it holds now.

        All or nothing: if the map raises, the buffer is as it was, so the
        items can be tried again without counting any pair twice.
        """
        job = self.job
        if self.running:
            before = self.values.copy()  # a C copy, cheap next to the pairs: to go back to if the map raises
            try:
                for item in items:
                    _add_up(self.values, _pairs_of(job.map(item)))
            except BaseException:
                self.values = before
                raise
            return len(self.values)
        folded: dict[Hashable, list[Any]] = {}  # the lists are appended to: fold apart, then merge
        since_combine = 0
        for item in items:
            since_combine += _collect(folded, _pairs_of(job.map(item)))
            if since_combine >= _COMBINE_EVERY and job.has_combine:  # a big chunk: fold its lists as it goes
                self._combine(folded)
                since_combine = 0
        self._merge(folded, since_combine)
        return len(self.values)

    def merge(self, values: dict[Hashable, Any]) -> None:
        """Take in the ``values`` of a buffer of the same job filled elsewhere (an isolated worker's child)."""
        if self.running:
            _add_up(self.values, values.items())
        else:
            self._merge(values, sum(map(len, values.values())))

    def _merge(self, lists: dict[Hashable, list[Any]], pairs: int) -> None:
        """Add *lists* (of *pairs* values not combined yet) to this buffer's lists."""
        if not self.values:
            self.values = lists
        else:
            _merge_lists(self.values, lists)
        self._since_combine += pairs
        if self._since_combine >= _COMBINE_EVERY:
            self.combine()

    def combine(self) -> None:
        """Fold each key's values with the job's combiner, if it has one (running totals are folded already)."""
        self._since_combine = 0
        if self.job.has_combine and not self.running:
            self._combine(self.values)

    def _combine(self, lists: dict[Hashable, list[Any]]) -> None:
        combine = self.job.combine
        for key, values in lists.items():
            if len(values) > 1:
                lists[key] = [combine(key, values)]

    def partitions(self, count: int) -> list[dict[Hashable, Any]]:
        """Split ``values`` into *count* dicts by :func:`stable_hash` of the key."""
        parts: list[dict[Hashable, Any]] = [{} for _ in range(count)]
        crc32 = zlib.crc32
        for key, values in self.values.items():
            # stable_hash's first case inline: a word count's keys are all str, and the call was half the time
            code = crc32(key.encode("utf-8", "surrogatepass")) if type(key) is str else stable_hash(key)
            parts[code % count][key] = values
        return parts


def _pairs_of(mapped: Any) -> Iterable[tuple[Hashable, Any]]:
    """What ``map`` returned, as pairs: a mapping stands for its items."""
    return mapped.items() if isinstance(mapped, Mapping) else mapped


def _add_up(totals: dict[Hashable, Any], pairs: Iterable[tuple[Hashable, Any]]) -> None:
    """Add each pair's value to its key's total in *totals*: ``sum``'s additions, starting from 0."""
    get = totals.get
    for key, value in pairs:  # the hot loop of a word count: nothing else in it, not even a count
        totals[key] = get(key, 0) + value


def _merge_lists(lists: dict[Hashable, list[Any]], more: dict[Hashable, list[Any]]) -> None:
    """Extend each key's list in *lists* by its list in *more* (taken over, for a key new to *lists*)."""
    for key, values in more.items():
        bucket = lists.get(key)
        if bucket is None:
            lists[key] = values
        else:
            bucket.extend(values)


def _collect(lists: dict[Hashable, list[Any]], pairs: Iterable[tuple[Hashable, Any]]) -> int:
    """Append each pair's value to its key's list in *lists*; return how many pairs there were."""
    get = lists.get
    count = 0
    for count, (key, value) in enumerate(pairs, 1):
        bucket = get(key)
        if bucket is None:
            lists[key] = [value]
        else:
            bucket.append(value)
    return count


def in_key_order(values: dict[Hashable, Any]) -> dict[Hashable, Any]:
    """*values* with its keys sorted, or as it is if they do not compare (keys of mixed types).

    Each reduce member sorts its own keys, so that rank 0, sorting the
    members' results laid end to end, finds runs and merges them in about
    linear time: the sort is spread over the members, not done whole on rank 0.
    """
    try:
        return {key: values[key] for key in sorted(values)}  # keys alone: twice as quick as sorting the items
    except TypeError:
        return values


def shuffle_and_reduce(buffer: MapBuffer, comm: MPI.Intracomm) -> dict[Hashable, Any]:
    """Collective over *comm*: exchange partitions, then reduce the keys that landed here, in key order.

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
    adding_up = buffer.running and sums_its_values(type(buffer.job).reduce)
    # Adding up makes new totals and changes no value, so this rank's own part need not be copied; a
    # reduce of the user's might change its values in place, and the buffer must stay as it is (a lost
    # member makes the reduce run again).
    received = exchange(comm, parts, copy_own=not adding_up)
    if adding_up:
        totals: dict[Hashable, Any] = {}  # reduce(key, [t0, t1, ...]) is 0 + t0 + t1 ...: add them up as they come
        for part in received:
            _add_up(totals, part.items())
        return in_key_order(totals)
    merged: dict[Hashable, list[Any]] = {}
    for part in received:
        if buffer.running:
            part = {key: [total] for key, total in part.items()}
        _merge_lists(merged, part)
    reduce = buffer.job.reduce
    return in_key_order({key: reduce(key, values) for key, values in merged.items()})


def _all_ready(comm: MPI.Intracomm, ready: bool) -> bool:
    """Collective: whether every member is *ready*.

    A buffer ``Allreduce`` of one C int: no pickle crosses ranks (mpi4py's
    lowercase ``allreduce`` would send one), so there is nothing to seal.
    """
    flag = array("i", [int(ready)])
    comm.Allreduce(MPI.IN_PLACE, [flag, MPI.INT], op=MPI.LAND)
    return bool(flag[0])
