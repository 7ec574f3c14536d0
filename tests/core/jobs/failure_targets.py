"""TARGETs that fail, each in its own way, for tests/core/test_failure_parity.py.

    pydra run tests/core/jobs/failure_targets.py:Raises a b c
    pydra run -n 3 tests/core/jobs/failure_targets.py:Raises a b c
"""

from __future__ import annotations

import sys
import threading

import pydra


class TooBigGang(pydra.GangTask):
    """A gang larger than any job the tests start."""

    ranks = 5

    def work(self, *inputs):
        return self.comm.rank


class LockResult(pydra.Task):
    """A result no pickle can take."""

    def work(self, *inputs):
        return threading.Lock()


class Raises(pydra.Task):
    def work(self, *inputs):
        raise ValueError("user text from Raises")


class Interrupts(pydra.Task):
    def work(self, *inputs):
        raise KeyboardInterrupt()


class Exits(pydra.Task):
    def work(self, *inputs):
        sys.exit(3)


class SecondItemFails(pydra.Task):
    retries = 1
    retry_delay = 0.01

    def work(self, item):
        if item == "2":
            raise ValueError("user text for item 2")
        return item


def retried_items():
    """A Parallel whose item "2" fails on both of its tries."""
    return pydra.Parallel(SecondItemFails())
