"""Plain-Python workloads shared by the core job scripts and the tests that check them.

Nothing here imports pydra or mpi4py: the job scripts wrap these functions
in task trees and run them under mpiexec, while the tests call the very same
functions serially (in the pytest process, which must not initialise MPI) to
compute the answer each tree has to give.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

#: items for the Parallel cases: negatives, zero, enough to fill several chunks
ITEMS: list[int] = list(range(-7, 33))
#: inputs of the nested pipeline cases (like examples/pipeline.py)
PIPE_INPUTS: list[int] = [3, 4, 5, 6, 7]
#: lists for Parallel of Parallel, including an empty one
NESTED: list[list[int]] = [[1, 2], [3], [], [4, 5, 6], list(range(12))]
#: word groups for MapReduce inside Parallel
GROUPS: list[list[str]] = [
    ["apple", "pear", "apple"],
    ["pear", "fig"],
    ["apple", "apple", "apple", "kiwi"],
    ["date"],
    [],
    ["fig", "fig", "pear", "plum", "plum"],
]
#: words for the root MapReduce case
WORDS: list[str] = ["mpi", "rank", "master", "worker", "shuffle", "reduce", "gang", "pydra", "rank", "mpi"]

WORD = re.compile(r"[a-z']+")


def square(x: int) -> int:
    return x * x


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def numbers(n: int) -> list[int]:
    """1..n as a list."""
    return list(range(1, int(n) + 1))


def total(values: Iterable[int]) -> int:
    return sum(values)


def add_mul(a: int, b: int) -> int:
    return a * b + a


def sum_of_squares(n: int) -> int:
    return sum(square(i) for i in numbers(n))


def letters(word: str) -> Iterator[tuple[str, int]]:
    """The (letter, 1) pairs of a word."""
    for letter in word:
        yield letter, 1


def vocabulary(seed: int, size: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz'"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(size)]


def text_lines(seed: int, lines: int, words_per_line: int = 12, vocabulary_size: int = 800) -> list[str]:
    """Seeded random text: *lines* lines of words drawn (skewed) from a fixed vocabulary."""
    words = vocabulary(seed, vocabulary_size)
    rng = random.Random(seed + 1)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf-like: some words very common
    out = []
    for _ in range(lines):
        count = rng.randint(0, words_per_line * 2)
        line = " ".join(rng.choices(words, weights, k=count))
        out.append(line.upper() if rng.random() < 0.1 else line)
    return out


def words_of(line: str) -> list[str]:
    """The words the word-count jobs see in a line (the examples' regex, lower case)."""
    return WORD.findall(line.lower())


def word_count(lines: Iterable[str]) -> dict[str, int]:
    """The serial answer of every word-count job."""
    return dict(Counter(word for line in lines for word in words_of(line)))


def mixed_pairs(n: int) -> Iterator[tuple[Hashable, Any]]:
    """Pairs with keys of several types for one item n."""
    yield n % 5, n
    yield ("pair", n % 3, (n % 2 == 0)), 1
    yield f"s{n % 4}", n * n
    yield (n % 2, "x"), -n
    yield None if n % 7 == 0 else frozenset({n % 3, "f"}), 1


def mixed_reference(items: Iterable[int]) -> dict[Hashable, int]:
    out: dict[Hashable, int] = {}
    for n in items:
        for key, value in mixed_pairs(n):
            out[key] = out.get(key, 0) + value
    return out


def mean_pairs(n: int) -> Iterator[tuple[str, tuple[float, int]]]:
    """(key, (value, 1)) pairs for a per-key mean with a (sum, count) combiner."""
    yield f"k{n % 6}", (float(n), 1)


def mean_reference(items: Iterable[int]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for n in items:
        for key, (value, count) in mean_pairs(n):
            entry = sums.setdefault(key, [0.0, 0])
            entry[0] += value
            entry[1] += count
    return {key: s / c for key, (s, c) in sums.items()}


def ramp(n: int) -> Iterator[tuple[int, int]]:
    """Many pairs per item (enough to cross MapBuffer's periodic combine)."""
    for i in range(n):
        yield i % 97, 1


def text_item(i: int) -> str:
    """The i-th ~100-byte string of the memory test, made on the fly."""
    return f"{i:012d}" + "x" * (88 + i % 5)


def text_item_value(s: str) -> int:
    return len(s) % 7


def text_items_expected_sum(count: int) -> int:
    """sum(text_item_value(text_item(i)) for i in range(count)), in closed form."""
    full, rest = divmod(count, 5)
    per_cycle = sum((100 + r) % 7 for r in range(5))
    return full * per_cycle + sum((100 + r) % 7 for r in range(rest))
