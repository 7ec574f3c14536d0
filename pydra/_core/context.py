"""What a running task can ask of the rank executing it: progress reports, cancellation, logging.

A worker (or the master, when it runs units itself) makes each unit current
with :func:`enter` while it runs; :class:`pydra.Task` methods reach it through
:func:`current`. Outside any unit both are harmless no-ops.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Protocol


class UnitContext(Protocol):
    """The unit being executed: what its task may ask of the rank running it."""

    def report_progress(self, done: int, total: Optional[int], message: Optional[str]) -> None: ...

    def is_cancelled(self) -> bool: ...


_current: Optional[UnitContext] = None


def current() -> Optional[UnitContext]:
    """The unit executing in this process, or None outside any unit."""
    return _current


def enter(unit: Optional[UnitContext]) -> Optional[UnitContext]:
    """Make *unit* current; return the previous one, to restore with ``enter(previous)``.

    A plain function rather than a context manager: it runs once per unit, on the hot path.
    """
    global _current
    previous, _current = _current, unit
    return previous


class LogForwarder(logging.Handler):
    """Passes what task code logs to *forward(uid, time, level, logger, message)*, with the current unit.

    A worker forwards to rank 0; an isolated child to its rank.
    """

    def __init__(self, forward: Callable[..., None]) -> None:
        super().__init__()
        self.forward = forward

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.forward(getattr(_current, "uid", None), record.created, record.levelname, record.name, self.format(record))
        except Exception:  # a log line must never fail the task
            self.handleError(record)
