"""What a running task can ask of the rank executing it: progress reports and cancellation.

A worker (or the master, when it runs units itself) wraps each unit in
:func:`running`; :class:`pydra.Task` methods reach the current unit through
:func:`current`. Outside any unit both are harmless no-ops.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional


@dataclass
class UnitContext:
    """The unit being executed and the hooks its task may call."""

    uid: int
    report_progress: Callable[[int, Optional[int], Optional[str]], None]
    is_cancelled: Callable[[], bool]


_current: Optional[UnitContext] = None


def current() -> Optional[UnitContext]:
    """The unit executing in this process, or None outside any unit."""
    return _current


@contextlib.contextmanager
def running(context: UnitContext) -> Iterator[None]:
    """Make *context* the current unit for the duration of the block."""
    global _current
    previous, _current = _current, context
    try:
        yield
    finally:
        _current = previous
