"""Exceptions that say whose fault a failure is."""

from __future__ import annotations


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

