"""The :class:`Task` base class and the adapter that turns plain functions into tasks."""

from __future__ import annotations

from typing import Any, Callable

from pydra._core import context


class Task:
    """A unit of user work. Subclass it and override :meth:`work`.

    A task instance is pickled and shipped to the worker rank that runs it, so
    keep its attributes small and picklable. Subclasses need not call
    ``super().__init__()``.

    Example::

        class Square(pydra.Task):
            def work(self, x):
                return x * x
    """

    #: a serial task runs start to finish on the one rank it lands on.
    is_serial = True
    #: how many times a call that raised is tried again (on another worker when one is free).
    retries: int = 0
    #: seconds before the first retry; each further retry waits twice as long (at most 30 s).
    retry_delay: float = 0.1
    #: seconds one call may run before it is stopped and counts as a failed try (None: no limit).
    timeout: float | None = None

    def work(self, *args: Any, **kwargs: Any) -> Any:
        """Do the work and return the result. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override work()")

    def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Report that *done* of *total* steps are finished; rank 0 tracks it.

        Cheap enough to call in a loop: reports are rate-limited by the rank
        running the task.
        """
        unit = context.current()
        if unit is not None:
            unit.report_progress(done, total, message)

    @property
    def cancelled(self) -> bool:
        """True once rank 0 no longer wants this result; a long task should return early."""
        unit = context.current()
        return unit is not None and unit.is_cancelled()

    def root_args(self, inputs: tuple) -> tuple:
        """The arguments this task gets when it is the root of a run with *inputs*."""
        return inputs

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FunctionTask(Task):
    """A task that calls a plain function: ``Parallel(math.sqrt)`` wraps it in one."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def work(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionTask({getattr(self.function, '__qualname__', self.function)!r})"


def as_task(obj: Any) -> Task:
    """Accept a Task instance, a Task subclass (instantiated with no arguments) or a callable."""
    if isinstance(obj, Task):
        return obj
    if isinstance(obj, type) and issubclass(obj, Task):
        return obj()
    if callable(obj):
        return FunctionTask(obj)
    raise TypeError(f"expected a Task, a Task subclass or a callable, got {type(obj).__name__}")
