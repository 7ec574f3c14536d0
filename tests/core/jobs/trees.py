"""Task trees run by tests/core/test_trees.py, and their serial reference answers.

Run as a script under mpiexec (or alone): rank 0 prints one line
``RESULT <json>`` mapping each case name to [result, expected].
"""

import collections
import json
import random
import sys

import numpy as np
from mpi4py import MPI

import pydra


class Square(pydra.Task):
    def work(self, x):
        return x * x


class Numbers(pydra.Task):
    def work(self, n):
        return list(range(1, n + 1))


class Total(pydra.Task):
    def work(self, values):
        return sum(values)


class Counting(pydra.Task):
    """Reports progress as it goes: must not disturb the result."""

    def work(self, n):
        for i in range(n):
            self.progress(i + 1, n, "counting")
        return n


class WordCount(pydra.MapReduce):
    def map(self, line):
        for word in line.split():
            yield word, 1

    def reduce(self, word, counts):
        return sum(counts)


class CombinedWordCount(WordCount):
    def combine(self, word, counts):
        return sum(counts)


class MixedKeys(pydra.MapReduce):
    def map(self, n):
        yield n % 3, n
        yield ("pair", n % 2), 1
        yield str(n % 4), n

    def reduce(self, key, values):
        return sum(values)


class Collectives(pydra.GangTask):
    """Every collective, object and buffer form; returns what each produced."""

    def work(self, scale):
        comm = self.comm
        rank, size = comm.rank, comm.size
        out = {"size": size}
        out["allreduce"] = comm.allreduce(rank * scale)
        out["reduce"] = comm.reduce(rank + 1, op=MPI.PROD, root=0)
        out["bcast"] = comm.bcast("hello" if rank == 0 else None, root=0)
        out["gather"] = comm.gather(rank, root=0)
        out["scatter"] = comm.scatter([i * 10 for i in range(size)] if rank == 0 else None, root=0)
        out["alltoall"] = comm.alltoall([rank * 100 + i for i in range(size)])
        comm.barrier()
        a = np.full(4, float(rank + scale))
        total = np.empty(4)
        comm.Allreduce(a, total, op=MPI.SUM)
        out["Allreduce"] = total.tolist()
        reduced = np.empty(4) if rank == 0 else None
        comm.Reduce(a, reduced, op=MPI.MAX, root=0)
        out["Reduce"] = reduced.tolist() if rank == 0 else None
        b = np.arange(3, dtype="i") if rank == 0 else np.empty(3, dtype="i")
        comm.Bcast(b, root=0)
        out["Bcast"] = b.tolist()
        gathered = np.empty(size, dtype="i") if rank == 0 else None
        comm.Gather(np.array([rank], dtype="i"), gathered, root=0)
        out["Gather"] = gathered.tolist() if rank == 0 else None
        piece = np.empty(1, dtype="i")
        comm.Scatter(np.arange(size, dtype="i") * 7 if rank == 0 else None, piece, root=0)
        out["Scatter_sum"] = comm.allreduce(int(piece[0]))
        sent = np.arange(size, dtype="i") + rank * size
        got = np.empty(size, dtype="i")
        comm.Alltoall(sent, got)
        out["Alltoall_sum"] = comm.allreduce(int(got.sum()))
        comm.Barrier()
        return out


class PairGang(pydra.GangTask):
    ranks = 2

    def work(self, x):
        return self.comm.allreduce(x) + self.comm.size


def expected_collectives(size, scale):
    return {
        "size": size,
        "allreduce": sum(r * scale for r in range(size)),
        "reduce": int(np.prod(range(1, size + 1))),
        "bcast": "hello",
        "gather": list(range(size)),
        "scatter": 0,
        "alltoall": [r * 100 for r in range(size)],
        "Allreduce": [float(sum(r + scale for r in range(size)))] * 4,
        "Reduce": [float(size - 1 + scale)] * 4,
        "Bcast": [0, 1, 2],
        "Gather": list(range(size)),
        "Scatter_sum": sum(i * 7 for i in range(size)),
        "Alltoall_sum": sum(range(size * size)),
    }


def lines(seed, count):
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 12))) for _ in range(count)]


def cases(workers):
    """name -> (tree, inputs, serial answer)."""
    text = lines(7, 3000)
    counter = dict(collections.Counter(word for line in text for word in line.split()))
    mixed = collections.defaultdict(int)
    for n in range(50):
        mixed[n % 3] += n
        mixed[("pair", n % 2)] += 1
        mixed[str(n % 4)] += n
    return {
        "task": (Square(), (7,), 49),
        "function": (pydra.Parallel(abs), tuple(range(-20, 0)), [abs(x) for x in range(-20, 0)]),
        "sequence": (pydra.Sequence(Numbers(), Total(), Square()), (10,), 55**2),
        "parallel": (pydra.Parallel(Square()), tuple(range(100)), [x * x for x in range(100)]),
        "parallel_items": (pydra.Parallel(Square(), range(1000)), (), [x * x for x in range(1000)]),
        "parallel_chunk3": (pydra.Parallel(Square(), chunksize=3), tuple(range(50)), [x * x for x in range(50)]),
        "parallel_empty": (pydra.Parallel(Square()), (), []),
        "parallel_of_sequence_with_parallel": (
            pydra.Parallel(pydra.Sequence(Numbers(), pydra.Parallel(Square()), Total())),
            (1, 2, 3, 10),
            [sum(k * k for k in range(1, n + 1)) for n in (1, 2, 3, 10)],
        ),
        "sequence_parallel_then_serial": (
            pydra.Sequence(pydra.Parallel(Square()), pydra.Sequence(Total(), Square())),
            (1, 2, 3),
            (1 + 4 + 9) ** 2,
        ),
        "parallel_of_parallel": (
            pydra.Parallel(pydra.Parallel(Square())),
            ([1, 2], [], [3, 4, 5]),
            [[1, 4], [], [9, 16, 25]],
        ),
        "wordcount": (WordCount(), tuple(text), counter),
        "wordcount_combine": (CombinedWordCount(), tuple(text), counter),
        "mapreduce_empty": (WordCount(), (), {}),
        "mapreduce_mixed_keys": (MixedKeys(), tuple(range(50)), dict(mixed)),
        "mapreduce_in_parallel": (
            pydra.Parallel(WordCount()),
            (["a b a"], ["c"], []),
            [{"a": 2, "b": 1}, {"c": 1}, {}],
        ),
        "progress": (pydra.Parallel(Counting()), (5, 50, 500), [5, 50, 500]),
        "gang_all": (Collectives(), (3,), expected_collectives(workers, 3)),
        "gang_in_parallel": (
            pydra.Parallel(PairGang()),
            (1, 2, 3, 4),
            [2 * x + 2 for x in (1, 2, 3, 4)],
        ) if workers >= 2 else None,
    }


def normalise(value):
    """JSON cannot key by tuples or ints: compare dicts as sorted item lists."""
    if isinstance(value, dict):
        return sorted(([repr(k), normalise(v)] for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def main():
    workers = max(1, MPI.COMM_WORLD.size - 1)
    report = {}
    for name, case in cases(workers).items():
        if case is None:
            continue
        tree, inputs, expected = case
        if MPI.COMM_WORLD.rank == 0 and "TRACE" in sys.argv:
            print("case", name, file=sys.stderr, flush=True)
        result = pydra.run(tree, *inputs)
        if MPI.COMM_WORLD.rank == 0:
            report[name] = [normalise(result), normalise(expected)]
    if MPI.COMM_WORLD.rank == 0:
        print("RESULT " + json.dumps(report))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
