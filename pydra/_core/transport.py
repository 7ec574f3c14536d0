"""How rank 0's instructions reach the units' runners, and how their answers come back as events.

Two transports, chosen by the :class:`~pydra._core.master.Master`:

* :class:`MpiTransport`: the worker ranks, over MPI (the wire forms of
  :mod:`pydra._core.protocol`, pickled by :mod:`pydra.comm.mpi`); rank 0
  only ever ``Isend``\\s, so a worker busy in user code never blocks it.
* :class:`LocalTransport`: rank 0 runs every unit itself, with the same
  :class:`~pydra._core.runner.UnitRunner` a worker uses: a one-process job,
  or one whose workers were all lost.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from mpi4py import MPI

from pydra._core import protocol
from pydra._core.protocol import Failure, Tag
from pydra._core.runner import UnitRunner
from pydra._core.events import Heard, Progress, RepliesReceived, WorkerGone
from pydra.comm import failures, mpi, serial

if TYPE_CHECKING:
    from pydra._core.master import Master


class Transport(Protocol):
    """What the master needs of a transport."""

    def send(self, master: "Master", rank: int, commands: list[tuple]) -> list:
        """Deliver *commands* to *rank*; the events that this gives rise to at once (a refusal)."""

    def cancel(self, rank: int, uids: list[int]) -> None:
        """Tell *rank* that units *uids* are no longer wanted."""

    def beat(self, ranks: list[int]) -> None:
        """Send *ranks* a heartbeat."""

    def receive(self, master: "Master", now: float) -> list:
        """The events of every message that has arrived (log records go straight to *master*)."""

    def forget(self, rank: int) -> None:
        """*rank* is lost: stop waiting for sends to it and ignore what it says."""

    def collect(self) -> None:
        """Forget the sends that have completed."""

    def flush(self) -> None:
        """Wait for every send to complete."""


class MpiTransport:
    """Messages with the worker ranks of *comm*."""

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm
        self.outbox = mpi.Outbox(comm)
        self.ignored: set[int] = set()
        # Per worker, the commands messages it has not said it read, oldest first, and the
        # number of the oldest (a worker counts the messages it reads from 0): one may come back.
        self.unread: dict[int, deque] = {}
        self.first_unread: dict[int, int] = {}

    # -- out ----------------------------------------------------------------------------------

    def send(self, master: "Master", rank: int, commands: list[tuple]) -> list:
        try:
            payload, buffers = protocol.encode_commands(commands)
        except Exception:
            pass  # refused below, outside this handler: each command's own error must not chain to this one
        else:
            self._post(rank, commands, payload, buffers)
            return []
        return self._refuse(rank, commands)

    def _post(self, rank: int, commands: list[tuple], payload: bytes, buffers: list) -> None:
        if rank not in self.ignored:  # (a STOP for a lost rank that may still listen is not kept)
            self.unread.setdefault(rank, deque()).append(commands)
        # The arguments' arrays go from where they are: the caller must not change them meanwhile.
        self.outbox.post(payload, rank, Tag.COMMANDS, buffers)

    def _refuse(self, rank: int, commands: list[tuple]) -> list:
        """Some command could not be pickled: send the others; fail those units at once, with pickle's error."""
        sendable, failed = [], []
        for command in commands:
            try:
                protocol.encode_commands([command])
                sendable.append(command)
            except Exception as error:  # what pickle or the object's __reduce__ raised
                error.add_note(f"(while sending work to rank {rank})")
                serial.note_what_would_send_it(error)
                if command[0] not in protocol.NO_REPLY:
                    failed.append((command[1], False, Failure.here(error), 0.0, None))
        if sendable:
            self._post(rank, sendable, *protocol.encode_commands(sendable))
        return [RepliesReceived(rank, failed, time.monotonic())] if failed else []

    def cancel(self, rank: int, uids: list[int]) -> None:
        self.outbox.post(protocol.encode_cancel(uids), rank, Tag.CANCEL)

    def beat(self, ranks: list[int]) -> None:
        for rank in ranks:
            self.outbox.post(b"", rank, Tag.HEARTBEAT)

    def forget(self, rank: int) -> None:
        self.ignored.add(rank)
        self.unread.pop(rank, None)
        self.outbox.forget(rank)

    def collect(self) -> None:
        self.outbox.collect()

    def flush(self) -> None:
        self.outbox.flush()

    # -- in -----------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether a message from a worker waits to be received (cheaper than :meth:`receive` finding none)."""
        return mpi.pending(self.comm)

    def receive(self, master: "Master", now: float) -> list:
        events: list = []
        while True:
            try:
                message = mpi.try_receive(self.comm)
            except failures.RanksFailed as failed:  # ULFM: MPI saw them die, no need to wait for silence
                events += [WorkerGone(rank, "its process died", dead=True) for rank in failed.ranks
                           if rank != 0 and rank not in self.ignored]
                continue
            if message is None:
                break
            source, tag = message.source, message.tag
            if source in self.ignored:
                continue  # declared lost: its units are rescheduled, its word no longer counts
            if tag == Tag.REPLIES:
                read, packed = protocol.decode_replies(message.payload, message.buffers)
                self._read_up_to(source, read)
                events.append(RepliesReceived(source, self._unpack_all(source, packed), now))
            elif tag == Tag.HEARTBEAT:
                usage = protocol.decode(protocol.Usage, message.payload) if message.payload else None
                events.append(Heard(source, now, usage))
            elif tag == Tag.PROGRESS:
                report = protocol.decode(protocol.ProgressReport, message.payload)
                events += [Heard(source, now), Progress(source, *report)]
            elif tag == Tag.LOG:
                record = protocol.decode(protocol.LogRecord, message.payload)
                master.note(record.message, rank=source, level=record.level, logger=record.logger, uid=record.uid,
                            created=record.created)
                events.append(Heard(source, now))
            elif tag == Tag.BOUNCED:
                bounce = protocol.decode(protocol.Bounce, message.payload)
                events += [Heard(source, now), *self._resend_alone(master, source, bounce, now)]
        return events

    def _read_up_to(self, rank: int, read: int) -> None:
        """*rank* has read its first *read* commands messages: forget them."""
        unread = self.unread.get(rank)
        first = self.first_unread.get(rank, 0)
        while unread and first < read:
            unread.popleft()
            first += 1
        self.first_unread[rank] = first

    def _unpack_all(self, rank: int, packed: list[tuple]) -> list[tuple]:
        """The replies of one message with their values unpickled (see :meth:`_unpack`).

        First all at once, in one ``try`` (the common case, and rank 0's
        hottest loop); if any value does not load, one by one, so that only
        its own unit fails.
        """
        loads = serial.loads
        try:
            return [(uid, ok, loads(blob, buffers=buffers), seconds, blob if ok and not buffers else None)
                    for uid, ok, blob, seconds, buffers in packed]
        except (Exception, SystemExit):
            return [self._unpack(rank, *reply) for reply in packed]

    def _unpack(self, rank: int, uid: int, ok: bool, blob: bytes, seconds: float, buffers: tuple) -> tuple:
        """A reply with its value unpickled, or a failure saying why that is impossible here.

        Its last field is the pickle for the journal, when the value's buffers are all in it.
        """
        try:
            return (uid, ok, serial.loads(blob, buffers=buffers), seconds, blob if ok and not buffers else None)
        except (Exception, SystemExit) as exc:  # what unpickling raised: that unit's error, as itself
            exc.add_note(f"(while rank 0 unpickled a result from rank {rank})")
            return (uid, False, Failure.here(exc), seconds, None)

    def _resend_alone(self, master: "Master", rank: int, bounce: protocol.Bounce, now: float) -> list:
        """*rank* could not unpickle its commands message ``bounce.number``: send each of its units alone.

        Then only the unit whose data cannot be loaded there fails, with the
        worker's error (a class only rank 0 can import, say); the others run.
        The message's commands were kept until the worker said it read it:
        their data may not load on rank 0 either.
        """
        commands = self.unread[rank][bounce.number - self.first_unread.get(rank, 0)]
        self._read_up_to(rank, bounce.number + 1)
        units = [command for command in commands if command[0] not in protocol.NO_REPLY]
        others = [command for command in commands if command[0] in protocol.NO_REPLY]
        if len(units) > 1:
            if others:  # definitions first: the units need them (their blobs are pickled on their own)
                self._post(rank, others, *protocol.encode_commands(others))
            for command in units:
                self._post(rank, [command], *protocol.encode_commands([command]))
            return []
        try:
            failure = serial.loads(bounce.failure)
        except (Exception, SystemExit) as exc:  # the worker's error does not load here either: say so
            failure = Failure.here(RuntimeError(f"rank {rank} could not unpickle a command: {exc!r}"))
        if not units:
            master.note(f"rank {rank} could not unpickle {others}: {failure.exception!r}", level="WARNING")
            return []
        failure.exception.add_note(f"(while rank {rank} unpickled the call and its arguments)")
        return [RepliesReceived(rank, [(units[0][1], False, failure, 0.0, None)], now)]


class LocalTransport:
    """Rank 0 runs every unit itself, through the very same commands a worker gets.

    The units run in a thread of their own (``pydra-local``), as on a worker
    rank, so that the scheduler stays free meanwhile: a caller's cancel or
    shutdown is heard while a long call runs. Each message's commands run in
    order, and each reply goes back at once.
    """

    def __init__(self, master: "Master") -> None:
        self.master = master
        self.cancelled: set[int] = set()
        self.runner = UnitRunner(0, 1, master.host, _own_group, self._progress, self.cancelled.__contains__)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: deque = deque()  # events for the scheduler, appended by the thread
        self.thread = threading.Thread(target=self._serve, name="pydra-local", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                commands = self.inbox.get()
                for command in commands:
                    reply = self.runner.execute(command)
                    if reply is not None:
                        self.outbox.append(RepliesReceived(0, [(*reply, None)], time.monotonic()))
                        self.master.call_soon(self.master.wake)
                    reply = None  # no value outlives its reply, even while the next unit runs
                stop = commands[-1][0] == protocol.STOP
                del commands, command  # nor an argument its unit
                if stop:
                    return
        except BaseException:
            failures.abort(MPI.COMM_WORLD, f"pydra: internal error in rank 0's local runner\n{traceback.format_exc()}")

    def send(self, master: "Master", rank: int, commands: list[tuple]) -> list:
        self.inbox.put(commands)
        return []

    def _progress(self, uid: int, done: int, total: int | None, message: str | None) -> None:
        self.outbox.append(Progress(0, uid, done, total, message))

    def cancel(self, rank: int, uids: list[int]) -> None:
        self.cancelled.update(uids)

    def beat(self, ranks: list[int]) -> None:
        pass

    def receive(self, master: "Master", now: float) -> list:
        events = []
        while self.outbox:
            events.append(self.outbox.popleft())
        return events

    def forget(self, rank: int) -> None:
        pass

    def collect(self) -> None:
        pass

    def flush(self) -> None:
        self.thread.join()  # it has answered STOP: it is ending


def _own_group(members: list, tag: int) -> Any:
    return MPI.COMM_SELF.Dup()  # a gang of one: rank 0 alone
