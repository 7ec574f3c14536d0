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

import pickle
import time
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

PICKLE_PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Serialise a message for the wire."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


class Backoff:
    """Sleep between unsuccessful polls, doubling up to ``PYDRA_IDLE_SLEEP`` seconds."""

    FIRST = 1e-5

    def __init__(self, longest: float | None = None) -> None:
        self.longest = setting("IDLE_SLEEP", 0.002) if longest is None else longest
        self.delay = 0.0

    def reset(self) -> None:
        """Something happened: poll again at once next time."""
        self.delay = 0.0

    def next_delay(self) -> float:
        """How long to sleep after one more unsuccessful poll."""
        self.delay = min(self.longest, self.delay * 2 or self.FIRST)
        return self.delay

    def sleep(self) -> None:
        """Sleep for the next delay."""
        time.sleep(self.next_delay())


class Received(NamedTuple):
    """A message taken off the wire."""

    source: int
    tag: int
    payload: bytes


def try_receive(comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Received | None:
    """Receive one pending message matching *source* and *tag*, or return None at once."""
    status = MPI.Status()
    if not comm.Iprobe(source, tag, status):
        return None
    buffer = bytearray(status.Get_count(MPI.BYTE))
    comm.Recv([buffer, MPI.BYTE], status.Get_source(), status.Get_tag())
    return Received(status.Get_source(), status.Get_tag(), bytes(buffer))


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
        self._pending: list[tuple[MPI.Request, bytes]] = []

    def post(self, payload: bytes, dest: int, tag: int) -> None:
        """Start sending *payload* to *dest*."""
        request = self.comm.Isend([payload, MPI.BYTE], dest, tag)
        self._pending.append((request, payload))

    def collect(self) -> None:
        """Forget the sends that have completed."""
        if self._pending:
            self._pending = [(r, p) for r, p in self._pending if not r.Test()]

    def flush(self) -> None:
        """Wait for every send to complete."""
        if self._pending:
            MPI.Request.Waitall([r for r, _ in self._pending])
            self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)
