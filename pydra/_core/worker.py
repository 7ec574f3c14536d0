"""A worker rank's serve loop: receive commands from rank 0, run them, reply.

The worker side of the protocol in :mod:`pydra._core.protocol`; its master
side is :mod:`pydra._core.master`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Callable, Iterable

from mpi4py import MPI

from pydra._core import context, protocol
from pydra._core.protocol import Tag
from pydra._core.runner import UnitRunner
from pydra.comm import failures, mpi, serial
from pydra.comm.backoff import Backoff
from pydra.config import setting
from pydra.launcher.proctree import stat_fields

# Seconds between two progress reports of one unit, and between two looks for cancellations.
_PROGRESS_INTERVAL = 0.2
_CANCEL_POLL_INTERVAL = 0.01
# Longest a finished unit's reply waits for the rest of its message before it is sent alone.
_HOLD_REPLIES_SECONDS = 0.005
# /proc's unit of CPU time, in clock ticks a second.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ReplyBuffer:
    """The replies of one commands message, sent together unless one has waited ``hold`` seconds.

    Tiny units would cost rank 0 a message each; held replies share one. A
    reply must never wait behind a long unit, though (``concurrent.futures``
    callers see each result as soon as it exists), so with *hold* > 0 a
    thread of its own (:meth:`flush_late`) sends whatever has waited ``hold``
    seconds while the next unit runs. Without thread-safe MPI *hold* is 0 and
    every reply goes at once.
    """

    def __init__(self, send: Callable[[list], None], hold: float) -> None:
        self.hold = hold
        self._send = send
        self._lock = threading.Lock()  # the serve loop and flush_late both send
        self._held: list[tuple] = []
        self._since = 0.0
        self._busy = threading.Event()  # set while a message's units run

    def add(self, packed: tuple, urgent: bool) -> None:
        """Hold one packed reply; send what is held if *urgent* (a failure) or it has waited long enough."""
        with self._lock:
            now = time.perf_counter()
            if not self._held:
                self._since = now
            self._held.append(packed)
            if urgent or now - self._since >= self.hold:
                self._send_held()

    def flush(self) -> None:
        """Send every held reply (the message's units are done)."""
        with self._lock:
            self._send_held()

    def _send_held(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self._send(held)

    def running(self, busy: bool) -> None:
        """Tell :meth:`flush_late` whether units are running (it sleeps otherwise)."""
        if busy:
            self._busy.set()
        else:
            self._busy.clear()

    def flush_late(self, stopped: threading.Event) -> None:
        """Thread body: while units run, send replies that have waited ``hold`` seconds."""
        while not stopped.is_set():
            self._busy.wait()
            time.sleep(self.hold)
            with self._lock:
                if self._held and time.perf_counter() - self._since >= self.hold:
                    self._send_held()

    def release(self) -> None:
        """Wake :meth:`flush_late` so that it sees its *stopped* event."""
        self._busy.set()


class WorkerLoop:
    """Serves rank 0 until it says stop."""

    def __init__(self, comm: MPI.Intracomm, host: str, heartbeat: float | None = None, isolate: bool = False) -> None:
        self.comm = comm
        self.heartbeat = heartbeat  # seconds between heartbeats, None for none (no thread-safe MPI)
        self.master_timeout = setting("HEARTBEAT_TIMEOUT")
        self.max_result = setting("MAX_RESULT_BYTES")
        self.runner = UnitRunner(
            comm.rank, comm.size, host, self._make_group, self._report_progress, self._is_cancelled
        )
        if isolate:
            from pydra._core.isolation import IsolatedRunner  # only then: it needs subprocess and more

            self.runner = IsolatedRunner(self.runner, self.forward_log)
        logging.getLogger().addHandler(context.LogForwarder(self.forward_log))
        self.backoff = Backoff()
        # Holding replies needs a second thread that may call MPI: the heartbeat's condition too.
        self.replies = ReplyBuffer(self._reply, _HOLD_REPLIES_SECONDS if heartbeat else 0.0)
        self.cancelled: set[int] = set()
        self.read = 0  # commands messages read so far: rank 0 forgets them when told
        self._last_progress = 0.0
        self._last_cancel_poll = 0.0

    def serve(self) -> None:
        """Run commands until a STOP command arrives."""
        stopped = threading.Event()
        threads = []
        if self.heartbeat:
            threads = [
                threading.Thread(target=_or_abort(self.comm, self._beat), args=(stopped,), name="pydra-heartbeat",
                                 daemon=True),
                threading.Thread(target=_or_abort(self.comm, self.replies.flush_late), args=(stopped,),
                                 name="pydra-replies", daemon=True),
            ]
        for thread in threads:
            thread.start()
        try:
            self._serve()
        except (failures.RanksFailed, MPI.Exception) as error:
            if not _master_died(error):
                raise
            _end_orphan(self.comm)
        finally:
            stopped.set()
            self.replies.release()
            for thread in threads:
                thread.join()
            if self.heartbeat:
                # Leave no message unreceived for MPI_Finalize.
                while mpi.try_receive(self.comm, 0, Tag.HEARTBEAT) is not None:
                    pass

    def _beat(self, stopped: threading.Event) -> None:
        """Tell rank 0 this rank lives, even while user code runs (needs MPI_THREAD_MULTIPLE).

        Rank 0 beats back. If it falls silent it is gone, and this rank ends
        itself: a launcher told to let ranks die alone will not stop it.
        """
        status = MPI.Status()  # this thread's own: the main thread polls with the module's
        # Never a blocking send: with rank 0 dead, MPICH's queue to it fills after about 64 beats, and a
        # blocking Send then spins for good (a worker at 100% of a core), before the silence below is seen.
        # A beat goes only once the last one has.
        beats = mpi.Outbox(self.comm)
        heard = time.monotonic()
        while not stopped.wait(self.heartbeat):
            beats.collect()
            if not beats:
                beats.post(protocol.encode(_usage(self.runner.task_pids())), 0, Tag.HEARTBEAT)
            while mpi.try_receive(self.comm, 0, Tag.HEARTBEAT, status) is not None:
                heard = time.monotonic()
            silence = time.monotonic() - heard
            if silence > self.master_timeout and not stopped.is_set():
                rank = self.comm.rank
                os.write(2, f"pydra: rank 0 has been silent for {silence:.0f} s; rank {rank} stops\n".encode())
                failures.exit_without_finalize(0)  # 0: rank 0's own exit status tells whether the job failed

    def _serve(self) -> None:
        while True:
            commands = self._next_commands()
            if commands is None:
                continue
            self._take_cancellations()
            final = commands[-1]
            exit_process = final[2] if final[0] == protocol.STOP else None
            self.replies.running(len(commands) > 1)
            for command in commands:
                reply = self.runner.execute(command)
                if reply is not None:
                    # Rank 0 should hear of a failure at once: it may cancel the rest of this message.
                    self.replies.add(self._pack_reply(*reply), urgent=not reply[1])
            self.replies.running(False)
            self.replies.flush()
            # Drop this message's arguments and results before waiting for the next one.
            del commands, command, reply, final
            if exit_process is not None:
                if exit_process:
                    failures.exit_without_finalize(0)
                return

    def _next_commands(self) -> list[tuple] | None:
        """The next commands message, or None if it could not be unpickled here (it goes back to rank 0)."""
        message = mpi.receive(self.comm, 0, Tag.COMMANDS, self.backoff)
        number, self.read = self.read, self.read + 1
        try:
            return protocol.decode_commands(message.payload, message.buffers)
        except (Exception, SystemExit) as exc:  # an argument whose class only rank 0 can import, say
            failure = serial.dumps(protocol.Failure.capture(exc, *self._where()))
            mpi.send(self.comm, protocol.encode(protocol.Bounce(number, failure)), 0, Tag.BOUNCED)
            return None

    def _reply(self, packed: list[tuple]) -> None:
        payload, buffers = protocol.encode_replies(self.read, packed)
        mpi.send(self.comm, payload, 0, Tag.REPLIES, buffers)

    def _pack_reply(self, uid: int, ok: bool, value: object, seconds: float) -> tuple:
        """A reply with its value pickled on its own, so one bad value spoils one reply, not the message.

        The value's large buffers stay out of the pickle: they are sent from
        where they are.
        """
        try:
            blob, buffers = protocol.pack_value(value)
        except (Exception, SystemExit) as exc:  # what pickle, or the value's __reduce__, raised
            exc.add_note(f"(while sending a result from rank {self.comm.rank} to rank 0)")
            error: BaseException = exc
        else:
            size = len(blob) + sum(memoryview(buffer).nbytes for buffer in buffers)
            if size <= self.max_result:
                return (uid, ok, blob, seconds, buffers)
            error = ValueError(f"a result of {size} bytes is larger than PYDRA_MAX_RESULT_BYTES={self.max_result}")
        return (uid, False, serial.dumps(protocol.Failure.capture(error, *self._where())), seconds, ())

    def _where(self) -> tuple[int, int, str]:
        return self.runner.rank, self.runner.size, self.runner.host

    def _make_group(self, members: list, tag: int) -> MPI.Intracomm:
        # Collective only over the members, so other workers carry on undisturbed.
        group = self.comm.group.Incl(members)
        try:
            if failures.ulfm(self.comm):
                # Once a rank of the job has died, ULFM refuses Create_group over the world (even
                # for a group of survivors), on some members only; MPI-4's Create_from_group needs
                # no parent communicator and works.
                return MPI.Intracomm.Create_from_group(group, f"pydra-gang-{tag}")
            return self.comm.Create_group(group, tag % 32768)
        finally:
            group.Free()

    def _report_progress(self, uid: int, done: int, total: int | None, message: str | None) -> None:
        now = time.monotonic()
        if now - self._last_progress < _PROGRESS_INTERVAL and done != total:
            return
        self._last_progress = now
        mpi.send(self.comm, protocol.encode(protocol.ProgressReport(uid, done, total, message)), 0, Tag.PROGRESS)

    def forward_log(self, uid: int | None, created: float, level: str, name: str, message: str) -> None:
        """Send a log record of task code to rank 0 (any thread)."""
        mpi.send(self.comm, protocol.encode(protocol.LogRecord(uid, created, level, name, message)), 0, Tag.LOG)

    def _is_cancelled(self, uid: int) -> bool:
        now = time.monotonic()
        if now - self._last_cancel_poll >= _CANCEL_POLL_INTERVAL:
            self._last_cancel_poll = now
            self._take_cancellations()
        return uid in self.cancelled

    def _take_cancellations(self) -> None:
        while (message := mpi.try_receive(self.comm, 0, Tag.CANCEL)) is not None:
            self.cancelled.update(protocol.decode_cancel(message.payload))


def _or_abort(comm: MPI.Intracomm, body: Callable[..., None]) -> Callable[..., None]:
    """*body* for a thread of Pydra's own: if it raises, the rank could hang, so the job is aborted."""

    def run(*args: object) -> None:
        try:
            body(*args)
        except BaseException as error:
            if _master_died(error):
                _end_orphan(comm)
            failures.abort(comm, f"pydra: internal error in {threading.current_thread().name} on rank {comm.rank};"
                            f" aborting the MPI job\n{traceback.format_exc()}")

    return run


def _master_died(error: BaseException) -> bool:
    """Whether *error* is MPI saying that rank 0 died (ULFM; a worker only ever talks to rank 0 alone)."""
    return (isinstance(error, failures.RanksFailed) and 0 in error.ranks) or failures.peer_failed(error)


def _end_orphan(comm: MPI.Intracomm) -> None:
    """Rank 0 died: say so once and end this worker (never returns)."""
    os.write(2, f"pydra: rank 0 died; rank {comm.rank} stops\n".encode())
    failures.exit_without_finalize(1)


def _usage(task_pids: Iterable[int] = ()) -> protocol.Usage:
    """This rank's CPU seconds so far, resident bytes and OS threads, its task processes' (*task_pids*) added,
    and when (for the admin's ``workers``).

    An isolated worker's task code runs in a child process: without it, a
    worker whose task keeps a core busy would show idle. The CPU seconds
    include the children that have ended (the task processes replaced so far,
    and whatever they started). The threads are the kernel's count: a
    numerical library's pool shows, not only the threads Python knows of.
    """
    times = os.times()
    cpu = times.user + times.system + times.children_user + times.children_system
    resident, threads = _memory_and_threads("self")
    for pid in task_pids:
        try:
            ticks = stat_fields(pid)[11:15]  # utime, stime, cutime, cstime: fields 14 to 17
            cpu += sum(map(int, ticks)) / _CLOCK_TICKS
        except (OSError, ValueError):
            continue  # it has just ended (and been waited for: its seconds are among ours now), or not Linux
        more_resident, more_threads = _memory_and_threads(pid)
        resident, threads = resident + more_resident, threads + more_threads
    return protocol.Usage(cpu, resident, threads, time.monotonic())


def _memory_and_threads(pid: int | str) -> tuple[int, int]:
    """Resident bytes and OS threads of process *pid* (``"self"``: this one); zeros where /proc cannot say."""
    resident = threads = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    resident = int(line.split()[1]) * 1024  # in kB there
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resident, threads
