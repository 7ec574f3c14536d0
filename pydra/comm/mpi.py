"""Point-to-point messaging between rank 0 and the workers, without busy-waiting.

MPI implementations spin inside blocking receives, so an idle rank parked in
``recv`` burns a whole core. Pydra instead polls with ``Iprobe`` and sleeps
between polls with an exponential :class:`Backoff` that resets as soon as a
message arrives: busy ranks react within microseconds, idle ranks cost
almost nothing.

Messages are pickled here (protocol 5) and moved as raw bytes, so that a
message that fails to pickle or unpickle is reported by whoever owns it
rather than deep inside mpi4py.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections import deque
from typing import Any, NamedTuple

from mpi4py import MPI

from pydra.config import setting

#: master -> worker: a list of commands (see pydra._core.protocol)
TAG_COMMANDS = 11
#: worker -> master: the replies to one TAG_COMMANDS message, in order
TAG_REPLIES = 12
#: worker -> master: progress of the unit it is running
TAG_PROGRESS = 13
#: master -> worker: unit ids whose results are no longer wanted
TAG_CANCEL = 14
#: worker -> master: an empty message now and then, saying the rank is alive
TAG_HEARTBEAT = 15
#: worker -> master: a log record of task code (uid, time, level, logger name, message)
TAG_LOG = 16

PICKLE_PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Serialise a message for the wire."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


class Backoff:
    """Pacing for a polling loop: spin briefly, then sleep, doubling up to ``PYDRA_IDLE_SLEEP``.

    Right after activity the next message is usually microseconds away, and
    even the shortest sleep costs ~60 us of timer slack, so the first
    ``PYDRA_SPIN_SECONDS`` are spent polling (yielding the core between
    polls). After that the rank is idle and sleeps.
    """

    FIRST_SLEEP = 5e-5

    def __init__(self, longest: float | None = None) -> None:
        self.longest = setting("IDLE_SLEEP", 0.005) if longest is None else longest
        self.spin = setting("SPIN_SECONDS", 0.0005)
        self.delay = 0.0
        self.quiet_since: float | None = None

    def reset(self) -> None:
        """Something happened: poll eagerly again."""
        self.delay = 0.0
        self.quiet_since = None

    def sleep(self) -> None:
        """Pause after one more unsuccessful poll."""
        now = time.perf_counter()
        if self.quiet_since is None:
            self.quiet_since = now
        if now - self.quiet_since < self.spin:
            os.sched_yield()
            return
        self.delay = min(self.longest, self.delay * 2 or self.FIRST_SLEEP)
        time.sleep(self.delay)


class Received(NamedTuple):
    """A message taken off the wire."""

    source: int
    tag: int
    payload: bytearray


_status = MPI.Status()  # reused: each process polls from one thread


def try_receive(
    comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG, status: MPI.Status = _status
) -> Received | None:
    """Receive one pending message matching *source* and *tag*, or return None at once.

    A second thread that polls must bring its own *status*.
    """
    if not comm.Iprobe(source, tag, status):
        return None
    source, tag = status.Get_source(), status.Get_tag()
    buffer = bytearray(status.Get_count(MPI.BYTE))
    comm.Recv([buffer, MPI.BYTE], source, tag)
    return Received(source, tag, buffer)


def receive(comm: MPI.Comm, source: int, tag: int, backoff: Backoff) -> Received:
    """Wait, politely, for a message matching *source* and *tag*."""
    while True:
        message = try_receive(comm, source, tag)
        if message is not None:
            backoff.reset()
            return message
        backoff.sleep()


def send(comm: MPI.Comm, payload: bytes, dest: int, tag: int) -> None:
    """Send already serialised bytes, blocking until the buffer may be reused."""
    comm.Send([payload, MPI.BYTE], dest, tag)


class Outbox:
    """Non-blocking sends whose buffers stay alive until MPI is done with them.

    The master must never block on a worker busy in user code (a large message
    needs the receiver's cooperation to complete), so it only ever ``Isend``s.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self._abandoned: list = []
        self._pending: deque[tuple[MPI.Request, bytes, int]] = deque()

    def post(self, payload: bytes, dest: int, tag: int) -> None:
        """Start sending *payload* to *dest*."""
        request = self.comm.Isend([payload, MPI.BYTE], dest, tag)
        if not request.Test():  # small messages usually complete at once
            self._pending.append((request, payload, dest))

    def forget(self, dest: int) -> None:
        """Stop waiting for the sends to *dest*, a rank that is gone: they may never complete.

        Their buffers are kept alive for good, since MPI may still read them.
        """
        gone = [entry for entry in self._pending if entry[2] == dest]
        self._abandoned.extend(gone)
        self._pending = deque(entry for entry in self._pending if entry[2] != dest)

    def collect(self) -> None:
        """Forget the sends that have completed, oldest first."""
        pending = self._pending
        while pending and pending[0][0].Test():
            pending.popleft()

    def flush(self) -> None:
        """Wait for every send to complete (sends to forgotten ranks excepted)."""
        if self._pending:
            MPI.Request.Waitall([entry[0] for entry in self._pending])
            self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


def abort(comm: MPI.Comm, message: str) -> None:
    """Print *message* to stderr and abort the whole MPI job (never returns)."""
    os.write(2, message.encode())
    # The launcher forwards stderr asynchronously and stops once the job is aborted:
    # give it a moment, or the one message saying why would be lost.
    time.sleep(0.5)
    comm.Abort(1)


def end_job_after_loss(comm: MPI.Comm, status: int) -> None:
    """Rank 0, after ranks were lost: end the whole MPI job with *status* (never returns).

    MPI_Finalize would wait for the lost ranks forever, and a rank declared
    lost may still be running, stuck in a collective with a dead one; only
    MPI_Abort stops it. The healthy workers have been told to exit first.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    time.sleep(0.3)  # let the healthy workers' exits (and their last output) through
    comm.Abort(status)


def exit_without_finalize(status: int) -> None:
    """End this process now, skipping MPI_Finalize (never returns).

    Once a rank of the job has died, MPI_Finalize would wait for it forever;
    the survivors flush what they printed and leave without it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
