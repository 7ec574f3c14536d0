"""Task trees of every shape, run collectively; see tests/core/test_tasks.py for the answers.

    mpiexec -n 3 python tests/core/jobs/job_tasks.py [CASE...]
"""

from __future__ import annotations

import core_jobkit
import core_workloads as w
from mpi4py import MPI

import pydra


class AddMul(pydra.Task):
    def work(self, a, b):
        return w.add_mul(a, b)


class Square(pydra.Task):
    def work(self, x):
        return w.square(x)


class Numbers(pydra.Task):
    def work(self, n):
        return w.numbers(n)


class Total(pydra.Task):
    def work(self, values):
        return w.total(values)


class Double(pydra.Task):
    def work(self, x):
        return w.double(x)


class Scale(pydra.Task):
    """Carries state: the factor must travel with the instance."""

    def __init__(self, factor):
        self.factor = factor

    def work(self, x):
        return self.factor * x


class Empty(pydra.Task):
    def work(self, *args):
        return []


class FailsOn(pydra.Task):
    def __init__(self, bad):
        self.bad = bad

    def work(self, x):
        if x == self.bad:
            raise ValueError(f"item {x} is bad")
        return x


class LetterCount(pydra.MapReduce):
    def map(self, word):
        yield from w.letters(word)

    def combine(self, letter, counts):
        return sum(counts)

    def reduce(self, letter, counts):
        return sum(counts)


class WordCount(pydra.MapReduce):
    """Counts the words of one group (a list of words) per item."""

    def map(self, word):
        yield word, 1

    def reduce(self, word, counts):
        return sum(counts)


class Residues(pydra.MapReduce):
    def map(self, n):
        yield n % 7, n

    def reduce(self, residue, values):
        return sorted(values)


class SizeGang(pydra.GangTask):
    """Every worker (ranks=None): returns its size, the world ranks of its members and a sum."""

    def work(self, x):
        comm = self.comm
        members = comm.allgather(MPI.COMM_WORLD.rank)
        return {"x": x, "size": comm.size, "members": members, "sum": comm.allreduce(x * (comm.rank + 1))}


class SliceSum(pydra.GangTask):
    """Sum a list split across the gang's members."""

    def work(self, values):
        comm = self.comm
        return comm.allreduce(sum(values[comm.rank :: comm.size]))


def run(task, *inputs):
    return pydra.run(task, *inputs)


MIB = 1 << 20


def blob(mib):
    """A big result: *mib* MiB of bytes whose content depends on the size."""
    return bytes([mib % 251]) * (mib * MIB)


def digest(data):
    return [len(data), data[:1].hex(), data[-1:].hex()]


def large_results():
    """Multi-MiB results from the workers (a worker's big send must not block rank 0 or it)."""
    results = run(pydra.Parallel(blob, [9, 17, 3, 12]))
    return None if results is None else [digest(r) for r in results]


def large_items():
    """Multi-MiB items to the workers."""
    return run(pydra.Parallel(digest, [blob(n) for n in (11, 2, 15)]))


def split_comm():
    """Two sessions side by side on the two halves of COMM_WORLD (pydra.run's comm argument)."""
    world = MPI.COMM_WORLD
    color = world.rank % 2 if world.size > 1 else 0
    sub = world.Split(color, world.rank)
    try:
        result = pydra.run(pydra.Parallel(w.square, range(10 * (color + 1))), comm=sub)
    finally:
        size = sub.size
        sub.Free()
    reports = world.gather((color, size, result) if result is not None else None, root=0)
    if world.rank == 0:
        return sorted(r for r in reports if r is not None)
    return None


CASES = {
    "task_root": lambda: run(AddMul(), 6, 7),
    "task_class_root": lambda: run(pydra.Parallel(Square), *w.ITEMS),
    "function_parallel": lambda: run(pydra.Parallel(w.square, w.ITEMS)),
    "task_parallel": lambda: run(pydra.Parallel(Square(), w.ITEMS)),
    "parallel_root_inputs": lambda: run(pydra.Parallel(Square()), *w.ITEMS),
    "parallel_generator": lambda: run(pydra.Parallel(w.square, (x for x in w.ITEMS))),
    "parallel_chunksize": lambda: run(pydra.Parallel(w.square, range(100), chunksize=7)),
    "parallel_chunksize_1": lambda: run(pydra.Parallel(Square(), w.ITEMS, chunksize=1)),
    "parallel_large": lambda: run(pydra.Parallel(w.inc, range(20000))),
    "task_state": lambda: run(pydra.Parallel(Scale(3), w.ITEMS)),
    "sequence_serial_root": lambda: run(pydra.Sequence(Numbers(), Total(), w.double), 10),
    "sequence_parallel_first": lambda: run(pydra.Sequence(pydra.Parallel(w.square), w.total), *w.ITEMS),
    "parallel_of_sequence_with_parallel": lambda: run(
        pydra.Parallel(pydra.Sequence(Numbers(), pydra.Parallel(Square()), Total()), w.PIPE_INPUTS)
    ),
    "sequence_of_parallel_then_serial": lambda: run(
        pydra.Sequence(
            pydra.Parallel(pydra.Sequence(Numbers(), pydra.Parallel(w.square), w.total)),
            pydra.Sequence(Total(), Double()),
        ),
        *w.PIPE_INPUTS,
    ),
    "parallel_of_parallel": lambda: run(pydra.Parallel(pydra.Parallel(w.square), w.NESTED)),
    "parallel_of_serial_sequence": lambda: run(pydra.Parallel(pydra.Sequence(w.inc, Double()), w.ITEMS)),
    "nested_sequences": lambda: run(
        pydra.Sequence(pydra.Sequence(Numbers(), pydra.Parallel(w.square)), pydra.Sequence(w.total, w.inc)), 6
    ),
    "mapreduce_root": lambda: run(LetterCount(), *w.WORDS),
    "mapreduce_in_sequence": lambda: run(pydra.Sequence(Numbers(), Residues()), 40),
    "mapreduce_in_parallel": lambda: run(pydra.Parallel(WordCount(), w.GROUPS)),
    "gang_root": lambda: run(SizeGang(), 5),
    "gang_in_sequence": lambda: run(pydra.Sequence(Numbers(), SliceSum()), 100),
    "gang_in_parallel": lambda: run(pydra.Parallel(SizeGang(), [1, 2, 3])),
    "empty_parallel": lambda: run(pydra.Parallel(w.square, [])),
    "empty_parallel_generator": lambda: run(pydra.Parallel(Square(), iter(()))),
    "empty_parallel_of_parallel": lambda: run(pydra.Parallel(pydra.Parallel(w.square), [])),
    "empty_mapreduce": lambda: run(pydra.Sequence(Empty(), LetterCount())),
    "empty_root_parallel": lambda: run(pydra.Parallel(w.square)),
    "empty_root_mapreduce": lambda: run(LetterCount()),
    "failure_in_parallel": lambda: run(pydra.Parallel(FailsOn(13), w.ITEMS)),
    "after_failure": lambda: run(pydra.Parallel(w.square, w.ITEMS)),
    "large_results": large_results,
    "large_items": large_items,
    "split_comm": split_comm,
}

if __name__ == "__main__":
    core_jobkit.main(CASES)
