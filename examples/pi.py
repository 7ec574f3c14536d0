"""Monte Carlo estimate of pi: a Parallel of numpy batches, then a serial sum.

    pydra run -n 4 examples/pi.py:estimate_pi
    pydra run -n 4 examples/pi.py:estimate_pi 200      # 200 batches of a million darts

The INPUT is the number of batches (default 64). Each batch draws a million
points in the unit square with its own seed, so the answer is reproducible
whatever the number of ranks.
"""

import numpy as np

import pydra

DARTS_PER_BATCH = 1_000_000


class Batches(pydra.Task):
    """Turn the batch count into the list of seeds to spread."""

    def work(self, batches="64"):
        return list(range(int(batches)))


class CountHits(pydra.Task):
    """Darts of one batch that land inside the quarter circle."""

    def work(self, seed):
        points = np.random.default_rng(seed).random((DARTS_PER_BATCH, 2))
        return int(np.count_nonzero((points**2).sum(axis=1) <= 1.0))


class ToPi(pydra.Task):
    def work(self, hits):
        return 4.0 * sum(hits) / (len(hits) * DARTS_PER_BATCH)


def estimate_pi():
    return pydra.Sequence(Batches(), pydra.Parallel(CountHits()), ToPi())
