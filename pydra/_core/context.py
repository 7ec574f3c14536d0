"""What a running task can ask of the rank executing it: progress reports and cancellation.

A worker (or the master, when it runs units itself) makes each unit current
with :func:`enter` while it runs; :class:`pydra.Task` methods reach it through
:func:`current`. Outside any unit both are harmless no-ops.
"""

from __future__ import annotations

from typing import Optional, Protocol


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
