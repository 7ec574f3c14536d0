"""Containers that compose tasks: :class:`Sequence` runs children in order,
:class:`Parallel` runs one task over many items spread across the workers."""

from __future__ import annotations

import copy
from typing import Any, Iterable

from pydra.tasks.base import Task, as_task


class OverItems(Task):
    """A task whose input is an iterable of items (Parallel, MapReduce).

    The items are given either at construction or as the node's one input (the
    previous result in a Sequence, the INPUTs of ``pydra run`` at the root),
    never both.
    """

    is_serial = False
    items: Iterable[Any] | None = None
    #: how many items may fail for good (after their retries) before the whole node fails;
    #: a failed item's result is an :class:`~pydra.errors.ItemFailed` instead of a value.
    allow_failures: int = 0

    def root_args(self, inputs: tuple) -> tuple:
        # At the root, the run's inputs are the items themselves (maybe none at all).
        if self.items is not None and not inputs:
            return ()
        return (inputs,)

    def items_for(self, args: tuple) -> Iterable[Any]:
        """The items to process when this node is called with *args*."""
        name = type(self).__name__
        if self.items is not None:
            if args:
                raise TypeError(f"{name} was built with items and got an input too; give one or the other")
            return self.items
        if len(args) != 1:
            raise TypeError(f"{name} expects one iterable of items as input, got {len(args)} arguments")
        return args[0]


class Sequence(Task):
    """Run *tasks* in order; each child's result is the next child's input.

    The first child gets the Sequence's own input. A Sequence of serial tasks
    is shipped whole to one worker and runs there; one holding parallel
    children is walked by rank 0, child by child.
    """

    def __init__(self, *tasks: Any) -> None:
        if not tasks:
            raise TypeError("Sequence needs at least one task")
        self.children = [as_task(task) for task in tasks]

    @property
    def is_serial(self) -> bool:  # type: ignore[override]
        return all(child.is_serial for child in self.children)

    def root_args(self, inputs: tuple) -> tuple:
        return self.children[0].root_args(inputs)

    def work(self, *args: Any) -> Any:
        """Run a serial Sequence here, on this rank."""
        first, *rest = self.children
        value = first.work(*args)
        for child in rest:
            value = child.work(value)
        return value

    def __repr__(self) -> str:
        return f"Sequence({', '.join(map(repr, self.children))})"


class Parallel(OverItems):
    """Run *task* once per item, load-balanced over the workers; the result is
    the list of results in input order.

    *items* may be any iterable, including a generator too large to hold in
    memory: rank 0 pulls items only as workers have room for them. Tiny items
    are batched automatically; pass *chunksize* to fix the batch size.

    *retries* and *timeout* override the task's own (see :class:`Task`) for
    this node; with *allow_failures* = N, up to N items may fail for good and
    the node still succeeds, with an :class:`~pydra.errors.ItemFailed` in
    their place.
    """

    def __init__(
        self,
        task: Any,
        items: Iterable[Any] | None = None,
        *,
        chunksize: int | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        allow_failures: int = 0,
    ) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be a positive integer, got {chunksize}")
        if retries is not None and retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if allow_failures < 0:
            raise ValueError(f"allow_failures must be 0 or more, got {allow_failures}")
        self.task = as_task(task)
        if retries is not None or timeout is not None:
            self.task = copy.copy(self.task)  # the caller's task keeps its own settings
            if retries is not None:
                self.task.retries = retries
            if timeout is not None:
                self.task.timeout = timeout
        self.items = items
        self.chunksize = chunksize
        self.allow_failures = allow_failures

    def __repr__(self) -> str:
        return f"Parallel({self.task!r})"
