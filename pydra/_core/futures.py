"""A ``concurrent.futures.Future`` that is cheaper to make and to keep, for ``Executor.submit``.

A plain ``Future()`` builds a ``threading.Condition`` around an ``RLock``,
and the condition binds five of the lock's methods to itself: eleven objects
for the garbage collector, per future, that a caller keeping thousands of
futures has it walk again at every full collection (on rank 0 of 50,000
calls submitted, then waited for: 0.5 s of the caller's 0.9-1.0 s of CPU went
to the collector). :class:`LeanFuture` is the same future with a condition
that is its own lock (:class:`SelfLockingCondition`), whose deque of waiters
and whose list of callbacks are made only when first needed: three objects
for the collector (the future, its condition, its list of ``wait`` waiters),
and a quarter of the cost to make and keep (1.6 µs against 6-7,
collections included, with 20,000 kept; 2.1 µs with five objects). On
rank 0 of 200,000 calls submitted, then waited for, the three objects gave
59,000-69,000 calls/s against 48,000-51,000 with five (three runs of each,
alternated, 2026-12-06). Everything that reads a future (``result``,
``wait``, ``as_completed``, callbacks, ``cancel``) uses its condition only
through ``with``, ``acquire``/``release``, ``wait`` and ``notify_all``,
which it has.

It fills in the fields that ``Future.__init__`` sets itself; should a Python
version set others, it lets ``Future.__init__`` make them and only swaps the
condition (:data:`FIELDS_KNOWN`).
"""

from __future__ import annotations

import _thread
import concurrent.futures
import threading
from collections import deque
from typing import Callable
from concurrent.futures._base import PENDING

#: what ``Future.__init__`` sets, in every Python this package supports (3.10 on)
_FIELDS = frozenset({"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"})

#: whether this Python's ``Future.__init__`` sets exactly those fields (else LeanFuture calls it)
FIELDS_KNOWN = frozenset(vars(concurrent.futures.Future())) == _FIELDS


class SelfLockingCondition(_thread.RLock):
    """A ``threading.Condition`` over an ``RLock`` that is that lock: one object, not eight.

    ``threading.Condition``'s own ``wait`` and ``notify`` run on it: they need
    only the lock's ``_is_owned``, ``_release_save`` and ``_acquire_restore``
    (which an ``RLock`` has for exactly this) and a ``_waiters`` deque, made
    by the first ``wait``: most futures are never waited on through their
    own condition (``wait`` and ``as_completed`` use waiters of their own),
    and a deque is one more object for the collector per future kept.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque | None = None

    def wait(self, timeout: float | None = None) -> bool:
        if self._waiters is None:
            self._waiters = deque()
        return threading.Condition.wait(self, timeout)  # type: ignore[arg-type]

    wait_for = threading.Condition.wait_for

    def notify(self, n: int = 1) -> None:
        if self._waiters is not None:
            threading.Condition.notify(self, n)  # type: ignore[arg-type]
        elif not self._is_owned():  # nobody ever waited, but notifying still needs the lock, as Condition's does
            raise RuntimeError("cannot notify on un-acquired lock")

    def notify_all(self) -> None:
        self.notify(len(self._waiters) if self._waiters is not None else 0)


class LeanFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` whose condition is a :class:`SelfLockingCondition`."""

    def __init__(self) -> None:
        if not FIELDS_KNOWN:
            super().__init__()
        self._condition = SelfLockingCondition()
        if FIELDS_KNOWN:
            self._state = PENDING
            self._result = self._exception = None
            self._waiters: list = []
            self._done_callbacks: list | tuple = ()  # a list from the first add_done_callback

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future], object]) -> None:
        with self._condition:  # the list is made under the lock, as two threads may add at once
            if not isinstance(self._done_callbacks, list):
                self._done_callbacks = []
        super().add_done_callback(fn)
