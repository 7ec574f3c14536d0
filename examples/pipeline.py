"""A nested tree: Sequence and Parallel inside each other.

    pydra run -n 4 examples/pipeline.py:pipeline 3 4 5

For every INPUT n the inner pipeline builds the numbers 1..n, squares them
in parallel and sums the squares; then the outer Sequence adds up the sums.
Rank 0 walks the parallel parts; the serial leaves travel to workers, and
the small serial Sequence `Sum -> Double` runs whole on one worker.
"""

import pydra


class Numbers(pydra.Task):
    def work(self, n):
        return list(range(1, int(n) + 1))


class Square(pydra.Task):
    def work(self, x):
        return x * x


class Sum(pydra.Task):
    def work(self, values):
        return sum(values)


class Double(pydra.Task):
    def work(self, x):
        return 2 * x


def pipeline():
    sum_of_squares = pydra.Sequence(Numbers(), pydra.Parallel(Square()), Sum())
    return pydra.Sequence(
        pydra.Parallel(sum_of_squares),     # one inner pipeline per INPUT, run side by side
        pydra.Sequence(Sum(), Double()),    # serial: shipped whole to one worker
    )
