"""Executing commands from rank 0: the part of a worker that runs user code.

The same :class:`UnitRunner` serves a worker rank (fed over MPI by
:mod:`pydra._core.worker`) and rank 0 itself when the job has no workers,
which is how a one-process run gives the same results as a cluster.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from itertools import starmap
from typing import Any, Callable

from mpi4py import MPI

from pydra._core import context, protocol
from pydra._core.protocol import Failure
from pydra import target as targets
from pydra.comm import failures, serial
from pydra.errors import TargetError, UnitTimeout, WorkerLost
from pydra.tasks.base import Task
from pydra.tasks.mapreduce import MapBuffer, shuffle_and_reduce

#: builds the communicator of a gang from its member world ranks and a tag.
GroupFactory = Callable[[list, int], MPI.Intracomm]


class UnitRunner:
    """Runs commands on one rank and turns their outcome into replies."""

    def __init__(
        self,
        rank: int,
        size: int,
        host: str,
        make_group: GroupFactory,
        report_progress: Callable[[int, int, int | None, str | None], None],
        is_cancelled: Callable[[int], bool],
    ) -> None:
        self.rank, self.size, self.host = rank, size, host
        self.make_group = make_group
        self.report_progress = report_progress
        self.is_cancelled = is_cancelled
        self.defined: dict[int, Any] = {}
        self.buffers: dict[int, MapBuffer] = {}
        self.units_done = 0

    def task_pids(self) -> list[int]:
        """The processes task code runs in besides this one: none (an isolated runner has its child)."""
        return []

    def execute(self, command: tuple) -> tuple | None:
        """Run one command; return its reply, or None for a command that has none."""
        op = command[0]
        if op == protocol.DEFINE:
            _, tid, blob = command
            try:
                self.defined[tid] = blob.obj if type(blob) is protocol.AsIs else serial.loads(blob)
            except (Exception, SystemExit) as exc:  # the units that use it fail with this, not the rank
                self.defined[tid] = _Unloadable(exc)
            return None
        if op == protocol.FORGET:
            self.buffers.pop(command[1], None)
            return None
        if op == protocol.LOAD:
            self._load(command[1])
            return None
        if op == protocol.RESTART:
            return None  # task code runs in this process: there is no executor to restart
        uid = command[1]
        if self.is_cancelled(uid):
            return (uid, False, None, 0.0)
        handler = self._handlers[op]
        previous = context.enter(_Unit(self, uid))
        started = time.perf_counter()
        try:
            value, ok = handler(self, *command[1:]), True
        except BaseException as exc:  # sys.exit() or KeyboardInterrupt raised by a task fails it; the rank serves on
            if failures.peer_failed(exc):  # ULFM: a rank in this unit's collective died; rank 0 treats it as a loss
                exc = WorkerLost(f"a rank in this unit's collective died ({exc.Get_error_string()})")
            value, ok = Failure.capture(exc, self.rank, self.size, self.host), False
        finally:
            context.enter(previous)
        self.units_done += 1
        return (uid, ok, value, time.perf_counter() - started)

    def definition(self, tid: int) -> Any:
        """Definition *tid*; raises what unpickling it raised, if it could not be loaded here."""
        value = self.defined[tid]
        if isinstance(value, _Unloadable):
            raise value.error
        return value

    def _load(self, spec: Any) -> None:
        # No reply to fail: units that need the file fail to unpickle, and this says why.
        try:
            targets.load_module(spec)
        except TargetError as exc:
            print(f"pydra: rank {self.rank} on {self.host}: {exc}", file=sys.stderr, flush=True)

    # One handler per command; each takes the command's fields after the op.

    def _call(self, uid: int, function: Callable, args: tuple, kwargs: dict) -> Any:
        return function(*args, **kwargs)

    def _map(self, uid: int, tid: int, chunk: list, star: bool) -> list:
        function = self.definition(tid)
        timeout = None
        if isinstance(function, Task):
            function, timeout = function.work, function.timeout
        # Timeouts use SIGALRM, which only the main thread receives: not rank 0's scheduler
        # thread, when rank 0 runs units itself.
        if timeout and threading.current_thread() is threading.main_thread():
            call = (lambda item: function(*item)) if star else function
            return [limited(timeout, call, item) for item in chunk]
        return list(starmap(function, chunk) if star else map(function, chunk))

    def _mr_map(self, uid: int, tid: int, chunk: list, run: int) -> int:
        buffer = self.buffers.get(run)
        if buffer is None:
            buffer = self.buffers[run] = MapBuffer(self.definition(tid))
        return buffer.add(chunk)

    def _gang(self, uid: int, tid: int, members: list, args: tuple) -> Any:
        task = self.definition(tid)
        comm = self.make_group(members, uid)
        try:
            task.comm = comm
            value = task.work(*args)
            return value if comm.rank == 0 else None
        finally:
            task.comm = None
            comm.Free()

    def _mr_reduce(self, uid: int, tid: int, members: list, run: int) -> dict:
        # The pairs stay until rank 0 says FORGET: if a member is lost, the reduce runs
        # again among the survivors, with the lost member's items mapped anew.
        buffer = self.buffers.get(run) or MapBuffer(self.definition(tid))
        comm = self.make_group(members, uid)
        try:
            return shuffle_and_reduce(buffer, comm)
        finally:
            comm.Free()

    def _stop(self, uid: int, exit_process: bool) -> None:
        return None

    _handlers = {
        protocol.CALL: _call,
        protocol.MAP: _map,
        protocol.MR_MAP: _mr_map,
        protocol.GANG: _gang,
        protocol.MR_REDUCE: _mr_reduce,
        protocol.STOP: _stop,
    }


def limited(seconds: float, function: Callable, argument: Any) -> Any:
    """``function(argument)``, stopped with :class:`UnitTimeout` after *seconds* (main thread only).

    Python code, and C code that checks for signals (``time.sleep``, most
    I/O), is interrupted; a hang inside C code that holds the GIL is not.
    """

    def expire(signum: int, frame: Any) -> None:
        raise UnitTimeout(f"ran past its timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function(argument)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Unloadable:
    """Stands for a definition that could not be unpickled on this rank."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Unit:
    """The context of one running unit, as :mod:`pydra._core.context` describes it."""

    __slots__ = ("runner", "uid")

    def __init__(self, runner: UnitRunner, uid: int) -> None:
        self.runner, self.uid = runner, uid

    def report_progress(self, done: int, total: int | None, message: str | None) -> None:
        self.runner.report_progress(self.uid, done, total, message)

    def is_cancelled(self) -> bool:
        return self.runner.is_cancelled(self.uid)
