"""A worker rank's serve loop: receive commands from rank 0, run them, reply.

The worker side of the protocol in :mod:`pydra._core.protocol`; its master
side is :mod:`pydra._core.master`.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time

from mpi4py import MPI

from pydra._core import context, protocol
from pydra._core.isolation import IsolatedRunner
from pydra._core.runner import UnitRunner
from pydra.comm import mpi
from pydra.config import setting

# Seconds between two progress reports of one unit, and between two looks for cancellations.
_PROGRESS_INTERVAL = 0.2
_CANCEL_POLL_INTERVAL = 0.01
# Longest a finished unit's reply waits for the rest of its message before it is sent alone.
_HOLD_REPLIES_SECONDS = 0.005


class WorkerLoop:
    """Serves rank 0 until it says stop."""

    def __init__(self, comm: MPI.Intracomm, host: str, heartbeat: float | None = None, isolate: bool = False) -> None:
        self.comm = comm
        self.heartbeat = heartbeat  # seconds between heartbeats, None for none
        self.master_timeout = setting("HEARTBEAT_TIMEOUT", 10.0)
        self.max_result = setting("MAX_RESULT_BYTES", 1 << 30)
        self.runner = UnitRunner(
            comm.rank, comm.size, host, self._make_group, self._report_progress, self._is_cancelled
        )
        if isolate:
            self.runner = IsolatedRunner(self.runner, self.forward_log)
        logging.getLogger().addHandler(context.LogForwarder(self.forward_log))
        self.backoff = mpi.Backoff()
        self.cancelled: set[int] = set()
        self._last_progress = 0.0
        self._last_cancel_poll = 0.0

    def serve(self) -> None:
        """Run commands until a STOP command arrives."""
        stopped = threading.Event()
        if self.heartbeat:
            beat = threading.Thread(target=self._beat, args=(stopped,), name="pydra-heartbeat", daemon=True)
            beat.start()
        try:
            self._serve()
        finally:
            stopped.set()
            if self.heartbeat:
                beat.join()
                # Leave no message unreceived for MPI_Finalize.
                while mpi.try_receive(self.comm, 0, mpi.TAG_HEARTBEAT) is not None:
                    pass

    def _beat(self, stopped: threading.Event) -> None:
        """Tell rank 0 this rank lives, even while user code runs (needs MPI_THREAD_MULTIPLE).

        Rank 0 beats back. If it falls silent it is gone, and this rank ends
        itself: a launcher told to let ranks die alone will not stop it.
        """
        status = MPI.Status()  # this thread's own: the main thread polls with the module's
        heard = time.monotonic()
        while not stopped.wait(self.heartbeat):
            mpi.send(self.comm, mpi.dumps(_usage()), 0, mpi.TAG_HEARTBEAT)
            while mpi.try_receive(self.comm, 0, mpi.TAG_HEARTBEAT, status) is not None:
                heard = time.monotonic()
            silence = time.monotonic() - heard
            if silence > self.master_timeout and not stopped.is_set():
                rank = self.comm.rank
                os.write(2, f"pydra: rank 0 has been silent for {silence:.0f} s; rank {rank} stops\n".encode())
                mpi.exit_without_finalize(0)  # 0: rank 0's own exit status tells whether the job failed

    def _serve(self) -> None:
        while True:
            message = mpi.receive(self.comm, 0, mpi.TAG_COMMANDS, self.backoff)
            commands = pickle.loads(message.payload)
            self._take_cancellations()
            replies: list[tuple] = []
            held_since = time.perf_counter()
            for command in commands:
                reply = self.runner.execute(command)
                if reply is None:
                    continue
                replies.append(reply)
                # Send early what rank 0 should know now: a failure (it may cancel the
                # rest of this message) or results that have already waited a while.
                now = time.perf_counter()
                if not reply[1] or now - held_since > _HOLD_REPLIES_SECONDS:
                    self._reply(replies)
                    replies, held_since = [], now
            if replies:
                self._reply(replies)
            if commands[-1][0] == protocol.STOP:
                if commands[-1][2]:
                    mpi.exit_without_finalize(0)
                return

    def _reply(self, replies: list[tuple]) -> None:
        mpi.send(self.comm, self._pack(replies), 0, mpi.TAG_REPLIES)

    def _pack(self, replies: list[tuple]) -> bytes:
        """The TAG_REPLIES payload: each value pickled on its own, so one bad value spoils one reply."""
        return mpi.dumps([self._pack_reply(*reply) for reply in replies])

    def _pack_reply(self, uid: int, ok: bool, value: object, seconds: float) -> tuple:
        try:
            blob = mpi.dumps(value)
        except Exception as exc:
            error: Exception = TypeError(f"result of type {type(value).__name__} cannot be pickled: {exc}")
        else:
            if len(blob) <= self.max_result:
                return (uid, ok, blob, seconds)
            error = ValueError(f"a result of {len(blob)} bytes is larger than PYDRA_MAX_RESULT_BYTES={self.max_result}")
        return (uid, False, mpi.dumps(protocol.Failure.capture(error, *self._where())), seconds)

    def _where(self) -> tuple[int, int, str]:
        return self.runner.rank, self.runner.size, self.runner.host

    def _make_group(self, members: list, tag: int) -> MPI.Intracomm:
        # Collective only over the members, so other workers carry on undisturbed.
        group = self.comm.group.Incl(members)
        try:
            return self.comm.Create_group(group, tag % 32768)
        finally:
            group.Free()

    def _report_progress(self, uid: int, done: int, total: int | None, message: str | None) -> None:
        now = time.monotonic()
        if now - self._last_progress < _PROGRESS_INTERVAL and done != total:
            return
        self._last_progress = now
        mpi.send(self.comm, mpi.dumps((uid, done, total, message)), 0, mpi.TAG_PROGRESS)

    def forward_log(self, uid: int | None, created: float, level: str, name: str, message: str) -> None:
        """Send a log record of task code to rank 0 (any thread)."""
        mpi.send(self.comm, mpi.dumps((uid, created, level, name, message)), 0, mpi.TAG_LOG)

    def _is_cancelled(self, uid: int) -> bool:
        now = time.monotonic()
        if now - self._last_cancel_poll >= _CANCEL_POLL_INTERVAL:
            self._last_cancel_poll = now
            self._take_cancellations()
        return uid in self.cancelled

    def _take_cancellations(self) -> None:
        while (message := mpi.try_receive(self.comm, 0, mpi.TAG_CANCEL)) is not None:
            self.cancelled.update(pickle.loads(message.payload))


def _usage() -> tuple[float, int, float]:
    """This process's CPU seconds so far, resident memory in bytes, and when (for the admin's ``workers``)."""
    times = os.times()
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        resident = 0  # not Linux: memory is not reported
    return times.user + times.system, resident, time.monotonic()

