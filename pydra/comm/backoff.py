"""Pacing for polling loops: react within microseconds after activity, cost almost nothing when idle.

MPI implementations spin inside blocking receives, so an idle rank parked in
``recv`` burns a whole core. Pydra's ranks poll instead (:mod:`pydra.comm.mpi`)
and pace their polls with a :class:`Backoff`.
"""

from __future__ import annotations

import os
import time

from pydra.config import setting


class Backoff:
    """Pacing for a polling loop: spin briefly, then sleep a tenth of the quiet time so far, up to ``PYDRA_IDLE_SLEEP``.

    Right after activity the next message is usually microseconds away, and
    even the shortest sleep costs ~60 us of timer slack, so the first
    ``PYDRA_SPIN_SECONDS`` are spent polling (yielding the core between
    polls). After that the rank sleeps between polls, each sleep a tenth
    (:attr:`LATE`) of how long it has been quiet: a message that comes after
    a quiet time *T* is seen at most about *T*/10 late (a 64 MiB reply that
    takes 40 ms, 4 ms late at most), where sleeps that double each time
    could make it wait up to *T* more, and an idle rank still wakes only
    every ``PYDRA_IDLE_SLEEP``.
    """

    FIRST_SLEEP = 5e-5
    #: the longest a message waits to be seen, as a fraction of the quiet time before it
    LATE = 0.1

    def __init__(self, longest: float | None = None) -> None:
        self.longest = setting("IDLE_SLEEP") if longest is None else longest
        self.spin = setting("SPIN_SECONDS")
        self.quiet_since: float | None = None

    def reset(self) -> None:
        """Something happened: poll eagerly again."""
        self.quiet_since = None

    def sleep(self) -> None:
        """Pause after one more unsuccessful poll."""
        now = time.perf_counter()
        if self.quiet_since is None:
            self.quiet_since = now
        quiet = now - self.quiet_since
        if quiet < self.spin:
            os.sched_yield()
            return
        time.sleep(min(self.longest, max(self.FIRST_SLEEP, quiet * self.LATE)))
