"""MapReduce gives collections.Counter's answer on any number of ranks, and its parts are sound.

Jobs (tests/core/jobs/job_mapreduce.py, one per rank count): word count over
5,000 seeded random lines with and without a combiner, keys of mixed types
(ints, str, tuples, frozensets, None), a combiner that returns partial
(sum, count) pairs, enough pairs per rank to trigger the periodic combine,
reduce seeing every value of its key exactly once, and equal keys of different
types (1, 1.0, True; numpy scalars) reducing together.

Unit tests, no MPI job: ``stable_hash`` is equal for equal keys and the same
in processes with different PYTHONHASHSEED; ``MapBuffer`` maps, combines and
partitions as documented.

The exchange alone (tests/core/jobs/job_exchange.py, 3 ranks, plain and
sealed): every bucket arrives equal, a copy unless its own bucket is kept.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import secrets
import statistics
import sys
from collections import Counter
from fractions import Fraction
from collections.abc import Hashable
from typing import Any

import mpi4py
import pytest
from mpijobs import IN_PROCESS, CaseCache, mpi_environment, rank_params, result_line, run_process, run_script
from mpijobs import workloads as w

# The pytest process is no MPI job: importing pydra.tasks must not initialise MPI here.
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

from pydra.tasks import mapreduce
from pydra.tasks.mapreduce import MapBuffer, MapReduce, stable_hash

SEED, LINES = 20240611, 5000  # the same as in job_mapreduce.py

EXPECTED = {
    "wordcount_combine": lambda: w.word_count(w.text_lines(SEED, LINES)),
    "wordcount_plain": lambda: w.word_count(w.text_lines(SEED, LINES)),
    "wordcount_in_sequence": lambda: w.word_count(w.text_lines(SEED, LINES)),
    "mixed_keys": lambda: w.mixed_reference(range(300)),
    "mean_combiner": lambda: w.mean_reference(range(1000)),
    "periodic_combine": lambda: {k: sum(1 for _ in range(8) for i in range(30000) if i % 97 == k) for k in range(97)},
    "all_values_once": lambda: {k: [n for n in range(500) if n % 11 == k] for k in range(11)},
    "equal_keys": lambda: {0: 300, 1: 300},
    "numpy_keys": lambda: {k + half: 30 for k in range(20) for half in (0, 0.5)},
    "mapping_combine": lambda: w.word_count(w.text_lines(SEED, LINES)),
    "mapping_plain": lambda: w.word_count(w.text_lines(SEED, LINES)),
    "mixed_keys_mapping": lambda: w.mixed_reference(range(300)),
    "mixed_keys_plain": lambda: w.mixed_reference(range(300)),
    "periodic_combine_lists": lambda: {k: sum(1 for _ in range(8) for i in range(30000) if i % 97 == k) for k in range(97)},
    "exact_sums": lambda: exact_sums(range(2000)),
    "median_reduce": lambda: median_lengths(w.text_lines(SEED, LINES)),
    "empty_input": dict,
    "empty_input_mapping": dict,
    "no_pairs": dict,
    "no_pairs_mapping": dict,
    "array_values": lambda: array_values(range(60)),
    "running_totals_other_reduce": lambda: {k: 2 * v for k, v in w.word_count(w.text_lines(SEED, LINES)).items()},
}


def array_values(items: range) -> dict:
    """What ArrayValues reduces to, computed without numpy."""
    out: dict = {}
    for n in items:
        for key, count, total, shape in ((n % 5, 1, sum(range(n, n + 1000)), (1000,)), ("f", 1, 12 * n, (3, 4)),
                                         ("strided", 1, sum(range(n, n + 40, 4)), (10,))):
            seen = out.setdefault(key, [0, 0, set()])
            seen[0] += count
            seen[1] += total
            seen[2].add(shape)
    return {key: (count, total, sorted(shapes)) for key, (count, total, shapes) in out.items()}


def exact_sums(items: range) -> dict[int, tuple[int, int]]:
    totals: dict[int, Fraction] = {}
    for n in items:
        totals[n % 7] = totals.get(n % 7, Fraction(0)) + Fraction(1, n + 1)
    return {k: (v.numerator, v.denominator) for k, v in totals.items()}


def median_lengths(lines: list[str]) -> dict[str, float]:
    lengths: dict[str, list[int]] = {}
    for line in lines:
        for word in w.words_of(line):
            lengths.setdefault(word[0], []).append(len(word))
    return {letter: statistics.median(values) for letter, values in lengths.items()}

mapreduce_jobs = CaseCache("job_mapreduce.py", list(EXPECTED))

RANKS = rank_params(IN_PROCESS, 1, 2, 3, 4)


def test_generated_text_is_big_enough() -> None:
    """The word count really is over several thousand lines with many distinct and repeated words."""
    lines = w.text_lines(SEED, LINES)
    counts = w.word_count(lines)
    assert len(lines) == LINES
    assert len(counts) > 500 and sum(counts.values()) > 40_000
    assert max(counts.values()) > 1000


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_mapreduce_equals_serial(case: str, ranks: int) -> None:
    got = mapreduce_jobs(ranks).ok(case)
    expected = EXPECTED[case]()
    if got != expected:
        wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
        extra = set(got) - set(expected)
        pytest.fail(f"{case} on {ranks or 'in-process'} ranks: {len(wrong)} keys wrong {dict(list(wrong.items())[:8])}, extra keys {extra}")
    # Exact: the same types too (1 == 1.0 == True, but a count must stay an int).
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}
    try:  # in key order, where the keys compare (the members sort their own, rank 0 merges the runs)
        assert list(got) == sorted(got)
    except TypeError:
        assert case.startswith("mixed_keys") or case == "array_values"  # keys of mixed types


# -- stable_hash ---------------------------------------------------------------------------------

KEYS: list[Hashable] = [
    "",
    "word",
    "naïve ünïcödé ✓",
    b"bytes\x00\xff",
    0,
    1,
    -1,
    2**70,
    -(2**70) + 3,
    2.5,
    -0.125,
    None,
    ("a", 1, (2.0, "b")),
    (),
    frozenset({"x", "y", "z", "w"}),
    frozenset({("t", 1), "s"}),
    ("tuple", frozenset({"p", "q"})),
]


def test_stable_hash_equal_numbers_collide() -> None:
    assert stable_hash(1) == stable_hash(1.0) == stable_hash(True)
    assert stable_hash(0) == stable_hash(0.0) == stable_hash(-0.0) == stable_hash(False)
    assert stable_hash(-3) == stable_hash(-3.0)
    assert stable_hash(10**20) == stable_hash(1e20)
    assert stable_hash((1, "a")) == stable_hash((1.0, "a")) == stable_hash((True, "a"))
    assert stable_hash(frozenset({1, "a"})) == stable_hash(frozenset({1.0, "a"}))


def test_stable_hash_distinguishes_and_is_an_unsigned_32_bit_int() -> None:
    hashes = [stable_hash(key) for key in KEYS]
    assert all(isinstance(h, int) and 0 <= h < 2**32 for h in hashes)
    words = w.vocabulary(99, 2000)
    assert len({stable_hash(word) for word in words}) >= len(set(words)) - 1  # crc32: collisions are rare
    assert stable_hash(("a", "b")) != stable_hash(("b", "a"))
    assert stable_hash(("a",)) != stable_hash("a")


def test_stable_hash_ignores_frozenset_order() -> None:
    items = [f"item{i}" for i in range(50)]
    assert stable_hash(frozenset(items)) == stable_hash(frozenset(reversed(items)))


_HASH_SCRIPT = """
import json, sys
import mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from pydra.tasks.mapreduce import stable_hash
print(json.dumps([stable_hash(key) for key in eval(sys.argv[1])]))
"""


@pytest.mark.parametrize("seed", ["0", "12345", "random"])
def test_stable_hash_same_in_other_processes(seed: str) -> None:
    """Python salts hash(str) per process; stable_hash must not vary with PYTHONHASHSEED."""
    env = dict(os.environ, PYTHONHASHSEED=seed)
    finished = run_process([sys.executable, "-c", _HASH_SCRIPT, repr(KEYS)], timeout=60, env=env)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == [stable_hash(key) for key in KEYS]


def test_stable_hash_numpy_scalars_like_python_numbers() -> None:
    """numpy scalars are equal (and hash equal) to Python numbers, so they are the same dict key:
    they must land in the same partition, or MapReduce splits one key across ranks."""
    np = pytest.importorskip("numpy")
    assert np.int64(7) == 7 and hash(np.int64(7)) == hash(7)
    assert stable_hash(np.int64(7)) == stable_hash(7)
    assert stable_hash(np.float64(2.5)) == stable_hash(2.5)
    assert stable_hash(np.float64(3.0)) == stable_hash(3)


# -- MapBuffer -----------------------------------------------------------------------------------


class _Count(MapReduce):
    """combine is ``return sum(values)``: the buffer keeps a running total per key."""

    def map(self, line: str):
        for word in line.split():
            yield word, 1

    def combine(self, key: Any, values: list) -> int:
        return sum(values)

    def reduce(self, key: Any, values: list) -> int:
        return sum(values)


class _Fold(_Count):
    """A combine written otherwise: the buffer keeps lists, folded by calling it."""

    def combine(self, key: Any, values: list) -> int:
        return functools.reduce(operator.add, values)


class _NoCombine(_Count):
    combine = MapReduce.combine  # type: ignore[assignment]


class _CountMapping(_Count):
    """map returns a mapping: its items are the pairs."""

    def map(self, line: str):
        return Counter(line.split())


class _NoCombineMapping(_CountMapping):
    combine = MapReduce.combine  # type: ignore[assignment]


LINES_SMALL = ["a b a", "c a", "b b b d", "", "a"]
COUNTS_SMALL = {"a": 4, "b": 4, "c": 1, "d": 1}


def _sum3(self, key, counts):
    return sum(counts)


def _sum_with_start(self, key, counts):
    return sum(counts, 0)


def _sum_of_key(self, key, counts):
    return sum(key)


def _max(self, key, counts):
    return max(counts)


def _sum_generator(self, key, counts):
    yield sum(counts)


def _shadowed_sum():
    sum = len  # noqa: F841 (a local: the function below sees its closure, not the builtin)

    def combine(self, key, counts):
        return sum(counts)

    return combine


@pytest.mark.parametrize(
    "method, expected",
    [(_sum3, True), (lambda self, k, v: sum(v), True), (_Count.combine, True), (_sum_with_start, False),
     (_sum_of_key, False), (_max, False), (_sum_generator, False), (_shadowed_sum(), False), (len, False),
     (_Fold.combine, False)],
)
def test_sums_its_values_recognises_only_a_plain_sum(method: Any, expected: bool) -> None:
    assert mapreduce.sums_its_values(method) is expected


def test_sums_its_values_sees_a_module_level_sum() -> None:
    namespace: dict = {"sum": lambda values: 0}
    exec("def combine(self, key, counts):\n    return sum(counts)\n", namespace)
    assert not mapreduce.sums_its_values(namespace["combine"])


def test_mapbuffer_running_totals() -> None:
    buffer = MapBuffer(_Count())
    assert buffer.running
    assert buffer.add(LINES_SMALL) == 4  # keys held
    assert buffer.values == COUNTS_SMALL
    buffer.combine()  # nothing left to fold
    assert buffer.values == COUNTS_SMALL
    buffer.add(["a c"])
    assert buffer.values == {"a": 5, "b": 4, "c": 2, "d": 1}
    assert {k: v for part in buffer.partitions(2) for k, v in part.items()} == {"a": 5, "b": 4, "c": 2, "d": 1}


@pytest.mark.parametrize("job", [_Count(), _CountMapping()], ids=["pairs", "mapping"])
def test_mapbuffer_merge_of_a_child_buffer(job: MapReduce) -> None:
    """An isolated worker's child fills a buffer of its own; the rank merges its values."""
    here, child = MapBuffer(job), MapBuffer(job)
    here.add(LINES_SMALL[:2])
    child.add(LINES_SMALL[2:])
    here.merge(child.values)
    assert here.values == COUNTS_SMALL


def test_mapbuffer_mapping_items_are_the_pairs() -> None:
    running = MapBuffer(_CountMapping())
    running.add(LINES_SMALL)
    assert running.values == COUNTS_SMALL
    lists = MapBuffer(_NoCombineMapping())
    lists.add(LINES_SMALL)
    assert lists.values == {"a": [2, 1, 1], "b": [1, 3], "c": [1], "d": [1]}


@pytest.mark.parametrize("kind", [_Count, _Fold, _NoCombine], ids=["running", "lists", "no-combine"])
def test_mapbuffer_add_is_all_or_nothing(kind: type) -> None:
    """If the map raises, the buffer is as it was: the items can be mapped again, counted once."""

    class Failing(kind):  # type: ignore[misc, valid-type]
        def map(self, line: str):
            for word in line.split():
                if word == "boom":
                    raise ValueError("boom")
                yield word, 1

    buffer = MapBuffer(Failing())
    buffer.add(["a b a"])
    before = {k: list(v) if isinstance(v, list) else v for k, v in buffer.values.items()}
    with pytest.raises(ValueError, match="boom"):
        buffer.add(["a c", "b boom"])
    assert buffer.values == before
    buffer.add(["a c", "b"])  # tried again: counted once
    total = {k: sum(v) if isinstance(v, list) else v for k, v in buffer.values.items()}
    assert total == {"a": 3, "b": 2, "c": 1}


def test_mapbuffer_lists_and_combine_folds() -> None:
    job = _Fold()
    assert job.has_combine
    buffer = MapBuffer(job)
    assert not buffer.running
    assert buffer.add(LINES_SMALL) == 4
    assert buffer.values == {"a": [1, 1, 1, 1], "b": [1, 1, 1, 1], "c": [1], "d": [1]}
    buffer.combine()
    assert buffer.values == {"a": [4], "b": [4], "c": [1], "d": [1]}
    buffer.add(["a c"])
    buffer.combine()
    assert buffer.values == {"a": [5], "b": [4], "c": [2], "d": [1]}


def test_mapbuffer_without_combine_keeps_every_value() -> None:
    job = _NoCombine()
    assert not job.has_combine
    buffer = MapBuffer(job)
    buffer.add(LINES_SMALL)
    buffer.combine()
    assert buffer.values["a"] == [1, 1, 1, 1] and buffer.values["b"] == [1, 1, 1, 1]


def test_mapbuffer_combines_periodically(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank holding many values in lists folds them as it goes, before the shuffle."""
    monkeypatch.setattr(mapreduce, "_COMBINE_EVERY", 5)
    buffer = MapBuffer(_Fold())
    buffer.add(["x x x"])
    assert buffer.values == {"x": [1, 1, 1]}  # 3 pairs: below the threshold
    buffer.add(["x x y"])  # 6 pairs since the last combine: fold
    assert buffer.values == {"x": [5], "y": [1]}
    buffer.add(["y y y y y y x"])  # 7 pairs in one add: its own lists are folded within it
    assert buffer.values == {"x": [5, 1], "y": [1, 6]}


@pytest.mark.parametrize("job", [_Count(), _Fold()], ids=["running", "lists"])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_mapbuffer_partitions_split_by_stable_hash(job: MapReduce, count: int) -> None:
    buffer = MapBuffer(job)
    lines = w.text_lines(3, 200)
    buffer.add(lines)
    buffer.combine()
    parts = buffer.partitions(count)
    assert len(parts) == count
    seen: dict = {}
    for index, part in enumerate(parts):
        for key, values in part.items():
            assert stable_hash(key) % count == index
            assert key not in seen
            seen[key] = values
    totals = {k: v if buffer.running else v[0] for k, v in seen.items()}
    assert totals == dict(Counter(word for line in lines for word in line.split()))


# -- the exchange --------------------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_exchange_copies_every_bucket_unless_told_to_keep_its_own(sealed: bool) -> None:
    """Each member gets what every member sent it; with ``copy_own=False`` its own bucket is the very object."""
    env = dict(mpi_environment(), PYDRA_JOB_KEY=secrets.token_hex(32)) if sealed else None
    reports = result_line(run_script(3, "job_exchange.py", timeout=120, env=env))
    assert [report["sealed"] for report in reports] == [sealed] * 3
    for rank, report in enumerate(reports):
        assert all(got["equal"] for got in report["copied"] + report["own-kept"]), report
        assert [got["identical"] for got in report["copied"]] == [False] * 3
        assert [got["identical"] for got in report["own-kept"]] == [member == rank for member in range(3)]
