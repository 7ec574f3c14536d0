"""Rank 0 kills itself while the workers have calls in hand (tests/core/test_faults.py, ULFM only)."""

import os
import signal
import time

import pydra


def slow(x: int) -> int:
    time.sleep(0.2)
    return x


with pydra.Executor() as executor:
    if executor is not None:
        futures = [executor.submit(slow, i) for i in range(50)]
        futures[0].result()  # the workers are busy now
        os.kill(os.getpid(), signal.SIGKILL)
