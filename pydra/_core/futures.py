"""A ``concurrent.futures.Future`` that is cheaper to make and to keep, for ``Executor.submit``.

A plain ``Future()`` builds a ``threading.Condition`` around an ``RLock``,
and the condition binds five of the lock's methods to itself: eleven objects
for the garbage collector, per future, that a caller keeping thousands of
futures has it walk again at every full collection (on rank 0 of 50,000
calls submitted, then waited for: 0.5 s of the caller's 0.9-1.0 s of CPU went
to the collector). :class:`LeanFuture` is the same future with a condition
that is its own lock (:class:`SelfLockingCondition`): five objects, and a
third to half the cost to make and keep (2-3 µs against 6-7, collections
included, with 50,000 kept). Everything that reads a future (``result``,
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
from concurrent.futures._base import PENDING

#: what ``Future.__init__`` sets, in every Python this package supports (3.10 on)
_FIELDS = frozenset({"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"})

#: whether this Python's ``Future.__init__`` sets exactly those fields (else LeanFuture calls it)
FIELDS_KNOWN = frozenset(vars(concurrent.futures.Future())) == _FIELDS


class SelfLockingCondition(_thread.RLock):
    """A ``threading.Condition`` over an ``RLock`` that is that lock: one object, not eight.

    ``threading.Condition``'s own ``wait`` and ``notify`` run on it: they need
    only the lock's ``_is_owned``, ``_release_save`` and ``_acquire_restore``
    (which an ``RLock`` has for exactly this) and a ``_waiters`` deque.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque = deque()

    wait = threading.Condition.wait
    wait_for = threading.Condition.wait_for
    notify = threading.Condition.notify
    notify_all = threading.Condition.notify_all


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
            self._done_callbacks: list = []
