"""TARGETs for tests/core/test_interrupts.py and the launcher's interrupt test: a long Parallel.

    pydra run -n 3 tests/core/jobs/interrupt_tasks.py:squares 0 1 2 ...

Each item leaves a file named after it in ``STARTED_DIR`` (if set) as it
starts, so a test knows the job is under way before it kills or interrupts it.
"""

from __future__ import annotations

import os
import time

import pydra


class SlowSquare(pydra.Task):
    def work(self, item):
        started = os.environ.get("STARTED_DIR")
        if started:
            open(os.path.join(started, item), "w").close()
        time.sleep(0.3)
        return int(item) ** 2


def squares():
    return pydra.Parallel(SlowSquare())
