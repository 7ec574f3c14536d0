"""Exceptions that say whose fault a failure is."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor


class PydraError(Exception):
    """Base class of the errors Pydra itself raises."""


class TargetError(PydraError):
    """The TARGET of ``pydra run`` cannot be found or is not a task (the user's input)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a worker, attached as ``__cause__``.

    Its text starts with ``Worker {rank} of {size} on {host}`` so the failing
    rank is the first thing a reader sees under the local traceback.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text



class WorkerLost(PydraError, BrokenExecutor):
    """A worker rank died, or stopped answering, while it ran a unit.

    Rank 0 reschedules the unit on another worker; when it still reaches the
    caller (the unit lost too many workers) it is a ``BrokenExecutor``, as a
    process pool's ``BrokenProcessPool`` is.
    """


class UnitTimeout(TimeoutError):
    """A unit ran past its task's ``timeout`` and was stopped; it counts as a failed try."""


class ItemFailed(PydraError):
    """Stands in a result list for an item that failed for good within ``allow_failures``.

    It is returned, not raised: *index* is the item's position in the input
    and *error* the text of its last failure.
    """

    def __init__(self, index: int, error: str) -> None:
        super().__init__(f"item {index} failed: {error}")
        self.index, self.error = index, error

    def __reduce__(self) -> tuple:
        return (ItemFailed, (self.index, self.error))


class TaskProcessDied(PydraError):
    """An isolated worker's child process died while running a task (segfault, os._exit, kill).

    The rank survives and starts a new child; the unit counts as a failed try.
    """


class SealConfigError(RuntimeError):
    """This rank cannot start sealing as configured (:mod:`pydra.comm.seal`; a one-line reason for the user).

    *report* is True on the one rank that should print it, so an N-rank job
    says it once.
    """

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report
