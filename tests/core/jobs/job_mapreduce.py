"""MapReduce jobs over generated data; see tests/core/test_mapreduce.py for the answers.

    mpiexec -n 4 python tests/core/jobs/job_mapreduce.py [CASE...]
"""

from __future__ import annotations

import core_jobkit
import core_workloads as w
import numpy as np

import pydra

SEED, LINES = 20240611, 5000


class WordCount(pydra.MapReduce):
    def map(self, line):
        for word in w.words_of(line):
            yield word, 1

    def combine(self, word, counts):
        return sum(counts)

    def reduce(self, word, counts):
        return sum(counts)


class PlainWordCount(pydra.MapReduce):
    """No combiner: every (word, 1) pair crosses the shuffle."""

    def map(self, line):
        for word in w.words_of(line):
            yield word, 1

    def reduce(self, word, counts):
        assert all(count == 1 for count in counts), "no combiner ran, so every value is a 1"
        return len(counts)


class MixedKeys(pydra.MapReduce):
    def map(self, n):
        yield from w.mixed_pairs(n)

    def combine(self, key, values):
        return sum(values)

    def reduce(self, key, values):
        return sum(values)


class Mean(pydra.MapReduce):
    """A combiner whose output is a partial (sum, count), not a final answer."""

    def map(self, n):
        yield from w.mean_pairs(n)

    def combine(self, key, pairs):
        return (sum(p[0] for p in pairs), sum(p[1] for p in pairs))

    def reduce(self, key, pairs):
        return sum(p[0] for p in pairs) / sum(p[1] for p in pairs)


class Ramp(pydra.MapReduce):
    """Hundreds of thousands of pairs: the mapping rank must combine as it goes."""

    def map(self, n):
        yield from w.ramp(n)

    def combine(self, key, counts):
        return sum(counts)

    def reduce(self, key, counts):
        return sum(counts)


class AllValues(pydra.MapReduce):
    """reduce must see every value of its key exactly once, on one rank."""

    def map(self, n):
        yield n % 11, n

    def reduce(self, key, values):
        return sorted(values)


class EqualKeys(pydra.MapReduce):
    """Equal keys of different types (1, 1.0, True) must reduce together."""

    def map(self, n):
        kind = n % 3
        key = n % 2
        yield (key, float(key), bool(key))[kind], 1

    def combine(self, key, counts):
        return sum(counts)

    def reduce(self, key, counts):
        return sum(counts)


class NumpyKeys(pydra.MapReduce):
    """numpy scalars equal to Python numbers are the same dict key, so must reduce together."""

    def map(self, n):
        # Blocks of 20 items alternate between numpy and Python keys, so ranks that
        # start mapping at different places meet a key first in different types.
        key = n % 20
        if (n // 20) % 2:
            yield np.int64(key), 1
            yield np.float64(key + 0.5), 1
        else:
            yield key, 1
            yield key + 0.5, 1

    def combine(self, key, counts):
        return sum(counts)

    def reduce(self, key, counts):
        return sum(counts)


class LinesTask(pydra.Task):
    """Makes the lines on a worker: the MapReduce's items are the previous child's result."""

    def work(self):
        return lines()


def lines():
    return w.text_lines(SEED, LINES)


def plain_keys(result):
    """numpy keys as Python numbers, for repr/literal_eval."""
    return {(k.item() if hasattr(k, "item") else k): v for k, v in result.items()} if result else result


CASES = {
    "wordcount_combine": lambda: pydra.run(WordCount(), *lines()),
    "wordcount_plain": lambda: pydra.run(PlainWordCount(), *lines()),
    "wordcount_in_sequence": lambda: pydra.run(pydra.Sequence(LinesTask(), WordCount())),
    "mixed_keys": lambda: pydra.run(MixedKeys(), *range(300)),
    "mean_combiner": lambda: pydra.run(Mean(), *range(1000)),
    "periodic_combine": lambda: pydra.run(Ramp(), *([30000] * 8)),
    "all_values_once": lambda: pydra.run(AllValues(), *range(500)),
    "equal_keys": lambda: pydra.run(EqualKeys(), *range(600)),
    "numpy_keys": lambda: plain_keys(pydra.run(NumpyKeys(), *range(600))),
}


if __name__ == "__main__":
    core_jobkit.main(CASES)
