"""Exceptions that say whose fault a failure is."""

from __future__ import annotations

import functools
import os
import traceback
from concurrent.futures import BrokenExecutor


class PydraError(Exception):
    """Base class of the errors Pydra itself raises."""


class TargetError(PydraError):
    """The TARGET of ``pydra run`` cannot be found or is not a task (the user's input)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a worker, attached as ``__cause__``.

    Its text starts with ``Worker {rank} of {size} on {host}`` so the failing
    rank is the first thing a reader sees under the local traceback. *frames*
    is False when no frame of it is the user's (see :func:`user_traceback`):
    the exception's own line then says it all.
    """

    def __init__(self, text: str, frames: bool = True) -> None:
        super().__init__(text)
        self.text, self.frames = text, frames

    def __str__(self) -> str:
        return self.text


def user_traceback(exception: BaseException) -> tuple[str, bool]:
    """*exception* formatted from the first frame of the user's; and whether any frame was left.

    The frames before it are Pydra's own machinery (a worker's serve loop,
    rank 0's tree walk) or the standard library's (``concurrent.futures``
    under it), which tell the user nothing about their code. So are Pydra's
    frames after the user's last: a timeout's handler, which raises where
    the task was interrupted.
    """
    report = traceback.TracebackException.from_exception(exception)
    frames = list(report.stack)
    while frames and _is_machinery(frames[0].filename):
        frames.pop(0)
    while frames and frames[-1].filename.startswith(_standard_paths()[0]):
        frames.pop()
    report.stack = traceback.StackSummary.from_list(frames)
    return "".join(report.format()), bool(frames)


@functools.cache
def _standard_paths() -> tuple[str, str, tuple[str, ...]]:
    """Pydra's directory, the standard library's, and where installed packages go (looked up on first use:
    sysconfig costs every process a few milliseconds to import)."""
    import sysconfig

    paths = sysconfig.get_paths()
    return (os.path.dirname(os.path.abspath(__file__)) + os.sep, paths["stdlib"] + os.sep,
            tuple({paths["purelib"] + os.sep, paths["platlib"] + os.sep}))


def _is_machinery(filename: str) -> bool:
    """Whether *filename* is Pydra's or the standard library's (not an installed package's)."""
    pydra, stdlib, installed = _standard_paths()
    if filename.startswith(pydra) or filename.startswith("<frozen "):
        return True
    return filename.startswith(stdlib) and not filename.startswith(installed) and "-packages" + os.sep not in filename


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
