"""MapReduce jobs over generated data; see tests/core/test_mapreduce.py for the answers.

    mpiexec -n 4 python tests/core/jobs/job_mapreduce.py [CASE...]
"""

from __future__ import annotations

import statistics
from collections import Counter
from fractions import Fraction

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


class CounterWordCount(WordCount):
    """The mapping fast path: map returns a Counter, whose items are the pairs (combined already)."""

    def map(self, line):
        return Counter(w.words_of(line))


class DictWordCount(pydra.MapReduce):
    """A mapping from map and no combiner: every entry crosses the shuffle as one value."""

    def map(self, line):
        return dict(Counter(w.words_of(line)))

    def reduce(self, word, counts):
        return sum(counts)


class MixedKeysMapping(MixedKeys):
    """Keys of mixed types, through the mapping fast path."""

    def map(self, n):
        return dict(w.mixed_pairs(n))


class MixedKeysPlain(MixedKeys):
    """Keys of mixed types without a combiner: the lists path."""

    combine = pydra.MapReduce.combine


class ListsRamp(Ramp):
    """A combine that is not written ``return sum(values)`` takes the lists path, folded every so many pairs."""

    def combine(self, key, counts):
        return sum(counts, 0)


class ExactSums(pydra.MapReduce):
    """Running totals of Fractions: exact, whatever the grouping."""

    def map(self, n):
        yield n % 7, Fraction(1, n + 1)

    def combine(self, key, values):
        return sum(values)

    def reduce(self, key, values):
        return sum(values)


class MedianLength(pydra.MapReduce):
    """A reduce that is not associative (a median) and no combiner: it must see every value at once."""

    def map(self, line):
        for word in w.words_of(line):
            yield word[0], len(word)

    def reduce(self, letter, lengths):
        return statistics.median(lengths)


class DoubledWordCount(WordCount):
    """Running totals, but a reduce that is not a plain sum: it is called on each rank's total."""

    def reduce(self, word, counts):
        assert all(type(count) is int and count > 0 for count in counts)
        return 2 * sum(counts)


class ArrayValues(pydra.MapReduce):
    """numpy arrays as values (out of band in the shuffle): contiguous, Fortran-ordered and strided."""

    def map(self, n):
        yield n % 5, np.arange(n, n + 1000, dtype=np.int64)
        yield "f", np.asfortranarray(np.full((3, 4), n, dtype=np.int32))
        yield "strided", np.arange(n, n + 40)[::4]

    def reduce(self, key, arrays):
        assert all(a.flags.writeable for a in arrays), "arrays from the shuffle are writable"
        return len(arrays), int(sum(int(a.sum()) for a in arrays)), sorted({a.shape for a in arrays})


class LinesTask(pydra.Task):
    """Makes the lines on a worker: the MapReduce's items are the previous child's result."""

    def work(self):
        return lines()


def lines():
    return w.text_lines(SEED, LINES)


def plain_keys(result):
    """numpy keys as Python numbers, for repr/literal_eval."""
    return {(k.item() if hasattr(k, "item") else k): v for k, v in result.items()} if result else result


def fractions(result):
    """Fractions as (numerator, denominator), for repr/literal_eval."""
    return {k: (v.numerator, v.denominator) for k, v in result.items()} if result is not None else result


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
    "mapping_combine": lambda: pydra.run(CounterWordCount(), *lines()),
    "mapping_plain": lambda: pydra.run(DictWordCount(), *lines()),
    "mixed_keys_mapping": lambda: pydra.run(MixedKeysMapping(), *range(300)),
    "mixed_keys_plain": lambda: pydra.run(MixedKeysPlain(), *range(300)),
    "periodic_combine_lists": lambda: pydra.run(ListsRamp(), *([30000] * 8)),
    "exact_sums": lambda: fractions(pydra.run(ExactSums(), *range(2000))),
    "median_reduce": lambda: pydra.run(MedianLength(), *lines()),
    "empty_input": lambda: pydra.run(WordCount()),
    "empty_input_mapping": lambda: pydra.run(CounterWordCount()),
    "no_pairs": lambda: pydra.run(WordCount(), *([""] * 50)),
    "no_pairs_mapping": lambda: pydra.run(CounterWordCount(), *([""] * 50)),
    "array_values": lambda: pydra.run(ArrayValues(), *range(60)),
    "running_totals_other_reduce": lambda: pydra.run(DoubledWordCount(), *lines()),
}


if __name__ == "__main__":
    core_jobkit.main(CASES)
