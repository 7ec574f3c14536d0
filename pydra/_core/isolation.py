"""Executor isolation: a worker rank runs task code in a child process it supervises.

With ``PYDRA_ISOLATE=1`` a worker rank keeps one child process
(``python -m pydra._core.child``) and hands it every unit that runs plain
task code (``CALL``, ``MAP``, ``MR_MAP``). A segfault, ``os._exit``, an
out-of-memory kill or a hang past the task's timeout then costs one try of
one unit, not the rank: :class:`IsolatedRunner` (the rank's side) sees the
child die or kills it, replies a failure, and starts a fresh child for the
next unit. Gang units and the MapReduce shuffle use MPI and stay in the rank.

The two sides talk over a pair of pipes in length-prefixed pickles
(:class:`Pipe`): the rank sends ``("load", specs)`` (the task files it
loaded, which the child imports only once a definition refers to one:
:class:`~pydra.target.TaskFiles`), then ``("define", tid, blob)`` and ``("run", command)``; the child answers ``("progress", uid, done, total, message)``
and ``("log", uid, time, level, logger, message)``
any number of times, then ``("reply", reply, pairs)`` where *pairs* are the
(key, values) a ``MR_MAP`` produced, for the rank to keep until the shuffle.
The child never initialises MPI.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from pydra import target as targets
from pydra._core import context, protocol
from pydra._core.protocol import Failure
from pydra._core.runner import UnitRunner
from pydra.comm import serial
from pydra.config import setting
from pydra.errors import TaskProcessDied, UnitTimeout
from pydra.tasks.base import Task
from pydra.tasks.mapreduce import MapBuffer

_HEADER = struct.Struct("<Q")
# Extra seconds the child gets past a unit's timeout to stop it itself, before it is killed.
_KILL_GRACE = 2.0
# How often the rank, waiting for its child, looks for cancellations.
_POLL_SECONDS = 0.05
# Environment variables by which a process would join the MPI job: the child must not.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "OMPI_COMM_", "OMPI_MCA_", "PRTE_", "MPI_LOCAL")


class Pipe:
    """Length-prefixed pickles over a pair of file descriptors."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self._buffer = bytearray()
        self._sending = threading.Lock()  # task threads log while the main thread replies

    def send(self, message: Any) -> None:
        data = serial.dumps(message)
        view = memoryview(_HEADER.pack(len(data)) + data)
        with self._sending:
            while view:
                view = view[os.write(self.write_fd, view) :]

    def receive(self, timeout: float | None = None) -> Any:
        """The next message; raises TimeoutError after *timeout* seconds, EOFError if the other side is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + size:
                    data = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
                    del self._buffer[: _HEADER.size + size]
                    return serial.loads(data)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.read_fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise EOFError
            self._buffer += chunk

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class _Child:
    """One running child process and the pipe to it."""

    def __init__(self, rank: int, size: int, host: str) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        argv = [sys.executable, "-m", "pydra._core.child", str(to_child_r), str(from_child_w), str(rank), str(size), host]
        # MPICH's launcher signals SIGUSR1 to a rank's whole process group when another rank ends, and
        # SIGUSR1 ends a process that does not handle it. The child inherits this thread's signal mask
        # through fork and exec: started with SIGUSR1 blocked, it never receives one (nor needs to).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            self.process = subprocess.Popen(argv, pass_fds=(to_child_r, from_child_w), env=child_environment())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(to_child_r)
        os.close(from_child_w)
        self.pipe = Pipe(from_child_r, to_child_w)
        self.known: set[int] = set()  # definitions sent
        self.loaded = 0  # task files sent, counted in pydra.target.LOADED

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.pipe.close()

    def close(self) -> None:
        """Let the child end on its own (it exits when its pipe closes)."""
        self.pipe.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()


class IsolatedRunner:
    """A worker rank's :class:`UnitRunner` whose task code runs in a child process.

    It answers ``execute`` like the runner it wraps, which still runs
    definitions, gangs, shuffles and STOP in the rank itself.
    """

    ISOLATED = (protocol.CALL, protocol.MAP, protocol.MR_MAP)

    def __init__(self, runner: UnitRunner, forward_log: Callable[..., None]) -> None:
        self.runner = runner
        self.forward_log = forward_log
        self.rank, self.size, self.host = runner.rank, runner.size, runner.host
        self.blobs: dict[int, bytes] = {}
        self.child: _Child | None = None

    def task_pids(self) -> list[int]:
        """The child that runs task code, if one runs now (any thread: the heartbeat's reports its usage)."""
        child = self.child  # once: the main thread may replace it meanwhile
        return [] if child is None else [child.process.pid]

    def execute(self, command: tuple) -> tuple | None:
        op = command[0]
        if op == protocol.DEFINE:
            self.blobs[command[1]] = command[2]
        elif op in (protocol.STOP, protocol.RESTART) and self.child is not None:
            self.child.close()
            self.child = None
        if op in self.ISOLATED:
            return self._in_child(command)
        return self.runner.execute(command)

    def _in_child(self, command: tuple) -> tuple:
        uid = command[1]
        if self.runner.is_cancelled(uid):
            return (uid, False, None, 0.0)
        started = time.perf_counter()
        try:
            child = self._hand_over(command)
        except OSError as exc:
            return self._failed(uid, TaskProcessDied(f"cannot start the task's process: {exc}"), started)
        limit = self._time_limit(command)
        deadline = None if limit is None else time.monotonic() + limit + _KILL_GRACE
        while True:
            try:
                message = child.pipe.receive(_POLL_SECONDS)
            except TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    self._discard_child()
                    return self._failed(uid, UnitTimeout(f"ran past its timeout of {limit:g} s; its process was killed"), started)
                if self.runner.is_cancelled(uid):
                    self._discard_child()  # the result is not wanted: stop computing it
                    return (uid, False, None, time.perf_counter() - started)
                continue
            except EOFError:
                status = child.process.wait()
                self._discard_child()
                return self._failed(uid, TaskProcessDied(f"the task's process (pid {child.process.pid}) {describe_status(status)}"), started)
            if message[0] == "progress":
                self.runner.report_progress(*message[1:])
                continue
            if message[0] == "log":
                self.forward_log(*message[1:])
                continue
            _, reply, pairs = message
            if pairs is not None:
                run = command[4]
                buffer = self.runner.buffers.get(run)
                if buffer is None:
                    buffer = self.runner.buffers[run] = MapBuffer(self.runner.definition(command[2]))
                buffer.merge(pairs)
            return reply

    def _hand_over(self, command: tuple) -> _Child:
        """Send *command* to the child, starting a new one if it died since its last unit."""
        try:
            child = self._ready_child(command)
            child.pipe.send(("run", command))
            return child
        except OSError:  # it died while idle (killed from outside): not this unit's fault
            self._discard_child()
        child = self._ready_child(command)
        child.pipe.send(("run", command))
        return child

    def _ready_child(self, command: tuple) -> _Child:
        if self.child is None:
            self.child = _Child(self.rank, self.size, self.host)
        if self.child.loaded < len(targets.LOADED):  # task files loaded since (a service's new jobs)
            self.child.pipe.send(("load", targets.LOADED[self.child.loaded :]))
            self.child.loaded = len(targets.LOADED)
        if command[0] != protocol.CALL:
            tid = command[2]
            if tid not in self.child.known:
                self.child.pipe.send(("define", tid, self.blobs[tid]))
                self.child.known.add(tid)
        return self.child

    def _time_limit(self, command: tuple) -> float | None:
        """Longest the child may take for *command*: its task's timeout per item."""
        if command[0] == protocol.CALL:
            return None
        task = self.runner.defined.get(command[2])
        timeout = task.timeout if isinstance(task, Task) else None
        return None if not timeout else timeout * len(command[3])

    def _discard_child(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child = None

    def _failed(self, uid: int, error: Exception, started: float) -> tuple:
        return (uid, False, Failure.capture(error, self.rank, self.size, self.host), time.perf_counter() - started)


def child_environment() -> dict[str, str]:
    """This process's environment without the variables by which a process would join the MPI job."""
    return {name: value for name, value in os.environ.items() if not name.startswith(_LAUNCHER_PREFIXES)}


def describe_status(status: int) -> str:
    """A child's end in words, from its return code: "exited with status 1", "was killed by SIGSEGV"."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


# -- the child's side ----------------------------------------------------------------------------


def serve_child(read_fd: int, write_fd: int, rank: int, size: int, host: str) -> None:
    """The child's loop: run what the rank sends until the pipe closes."""
    pipe = Pipe(read_fd, write_fd)
    _exit_with_parent()
    serial.use(setting("SERIALIZER"))  # as the rank does

    def report_progress(uid: int, done: int, total: int | None, message: str | None) -> None:
        pipe.send(("progress", uid, done, total, message))

    runner = UnitRunner(rank, size, host, _no_groups, report_progress, lambda uid: False)
    task_files = targets.TaskFiles()
    sys.meta_path.insert(0, task_files)  # first: a task file's module name wins, as on the rank
    logging.getLogger().addHandler(context.LogForwarder(lambda *record: pipe.send(("log", *record))))
    while True:
        try:
            message = pipe.receive()
        except EOFError:
            return
        if message[0] == "load":  # the task files this rank loaded: definitions may refer to them
            task_files.add(message[1])
            continue
        if message[0] == "define":
            runner.execute((protocol.DEFINE, message[1], message[2]))
            continue
        command = message[1]
        reply = runner.execute(command)
        pairs = None
        if command[0] == protocol.MR_MAP:
            buffer = runner.buffers.pop(command[4], None)
            pairs = buffer.values if buffer is not None else {}
        try:
            pipe.send(("reply", reply, pairs))
        except BrokenPipeError:
            return  # the rank is gone (its task may have killed it): no one to tell
        except (Exception, SystemExit) as exc:  # the result (or a pair) cannot be pickled
            exc.add_note(f"(while sending a result from rank {rank} to rank 0)")
            failed = (reply[0], False, Failure.capture(exc, rank, size, host), reply[3])
            pipe.send(("reply", failed, None))


def _no_groups(members: list, tag: int) -> Any:
    raise RuntimeError("an isolated child cannot join MPI communicators")


def _exit_with_parent() -> None:
    """End this child as soon as its rank is gone, even in the middle of a task."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pydra-parent-watch", daemon=True).start()
