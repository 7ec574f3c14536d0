"""The handle of one job: a task tree being evaluated on rank 0, as whoever started it sees it.

:meth:`pydra._core.evaluate.Walk.start` starts the walk of a tree on the
master's loop and returns a :class:`JobHandle`; ``Executor.submit_task``,
``pydra run`` and the service each keep one per job and use nothing else of
the walk: its future, its progress, its cancellation, its statistics, and
which workers run its units (what the service's ``workers`` and ``logs``
attribute to jobs).

Every method may be called from any thread. What changes goes through the
master's loop (:meth:`~pydra._core.master.Master.call_soon`); what is read
is a snapshot of counters and dicts that only the scheduler thread changes
(``list()`` of a dict is one step under the GIL, so a reader never sees one
half-changed).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import TYPE_CHECKING, Any

from pydra.jobstates import JobState

if TYPE_CHECKING:
    from pydra._core.evaluate import Walk
    from pydra._core.master import Master


class JobHandle:
    """One evaluation of a task tree on rank 0 (made by :meth:`Walk.start <pydra._core.evaluate.Walk.start>`).

    ``future`` is a ``concurrent.futures.Future`` of the root's result: it
    fails with the first error that fails the tree, and is cancelled by
    :meth:`cancel` (cancelling it directly does the same).
    """

    def __init__(self, master: Master, walk: Walk, future: concurrent.futures.Future) -> None:
        self._master = master
        self._walk = walk
        #: the root's result, its error, or cancelled
        self.future = future
        self.started = time.monotonic()
        self.finished: float | None = None
        future.add_done_callback(self._ended)

    def _ended(self, future: concurrent.futures.Future) -> None:
        self.finished = time.monotonic()

    # -- outcome --------------------------------------------------------------------------------

    def done(self) -> bool:
        """Whether the job has finished (done, failed or cancelled)."""
        return self.future.done()

    def result(self, timeout: float | None = None) -> Any:
        """The root's result, waiting up to *timeout* seconds (as ``future.result``)."""
        return self.future.result(timeout)

    @property
    def state(self) -> JobState:
        """RUNNING until the future settles, then DONE, FAILED or CANCELLED."""
        future = self.future
        if not future.done():
            return JobState.RUNNING
        if future.cancelled():
            return JobState.CANCELLED
        return JobState.FAILED if future.exception() is not None else JobState.DONE

    # -- control --------------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Hand out none of this job's units any more, cancel those running, and cancel the future.

        Returns whether the future was cancelled (False once it had settled).
        A gang unit already started runs to its end: its members may be
        inside MPI collectives, which cannot be interrupted.
        """
        # Through the loop, also when the walk's coroutine has not started yet or has ended:
        # the walk's streams belong to the scheduler thread.
        self._master.call_soon(self._walk.cancel)
        return self.future.cancel()

    # -- observation ----------------------------------------------------------------------------

    def progress(self) -> tuple[int, int | None]:
        """Items done (or failed within their allowance) so far, and the total if every input so far has a length."""
        return self._walk.progress()

    def units(self) -> dict[int, tuple[int, ...]]:
        """The units of this job that workers are running now: unit id -> the ranks running it."""
        return self._walk.running_units()

    def ranks(self) -> list[int]:
        """The worker ranks running a unit of this job now, in order."""
        return sorted({rank for ranks in self.units().values() for rank in ranks})

    def owns(self, uid: int) -> bool:
        """Whether unit *uid* is one of this job's, running now (to attribute a worker's log record)."""
        return self._walk.owns(uid)

    def statistics(self) -> dict[str, Any]:
        """A JSON-ready snapshot: state, units done and failed, items done, failed and total, workers, seconds.

        ``units_done`` counts units that succeeded (chunks of items, and gang
        runs); ``units_failed`` those that failed for good (within an
        allowance, or failing their node, as a node's input or journal
        failing does too) and gang runs that failed. Retries are not counted
        apart: a unit that succeeds on its second try is one unit done.
        """
        walk = self._walk
        items_done, items_failed, total = walk.item_counts()
        running = self.units()
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "state": self.state.value,
            "units_done": walk.units_done,
            "units_failed": walk.units_failed,
            "units_running": len(running),
            "items_done": items_done,
            "items_failed": items_failed,
            "items_total": total,
            "ranks": sorted({rank for ranks in running.values() for rank in ranks}),
            "elapsed": end - self.started,
        }
