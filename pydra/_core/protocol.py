"""Every message between rank 0 and the workers: its tag, its meaning, its shape on the wire.

This module owns them all; the two edges that touch MPI, rank 0's
:mod:`pydra._core.transport` and a worker's :mod:`pydra._core.worker`,
encode and decode with the pairs below and nothing else. It imports no MPI.

============  =========  ========================================================================
tag           direction  payload
============  =========  ========================================================================
COMMANDS 11   0 → w      a list of commands (below): a worker's share of one dispatch pass
REPLIES 12    w → 0      ``(messages read so far, [(uid, ok, pickled value or Failure, seconds, buffers)])``
PROGRESS 13   w → 0      :class:`ProgressReport` of the running unit
CANCEL 14     0 → w      a list of uids whose results are no longer wanted
HEARTBEAT 15  both       empty from rank 0; :class:`Usage` from a worker's heartbeat thread
LOG 16        w → 0      :class:`LogRecord`: what task code logged (WARNING and up, or its level)
BOUNCED 17    w → 0      :class:`Bounce`: a COMMANDS message the worker could not unpickle
============  =========  ========================================================================

Every unit command gets exactly one reply; the worker sends replies as soon
as one fails or has waited ``_HOLD_REPLIES_SECONDS`` (even while a later unit
runs), else when the message's last unit is done. Rank 0 counts each
worker's units in flight from those replies, and keeps each commands
message until the worker says (in REPLIES) that it read it: a BOUNCED
message's units go again one per message, so that only the unit that cannot
be loaded fails.

Commands and replies are plain tuples, on the wire and in memory, because
they sit on the hot path: a frozen dataclass costs several times more to
pickle, and even building a NamedTuple costs ~15 times a tuple, per unit, on
rank 0, which is the bottleneck. Their layouts:

==============================================  =================================================
``(DEFINE, tid, blob)``                         unpickle *blob* (a task, function or subtree)
                                                and keep it under id *tid* for later commands
                                                (in a one-process job, blob is an :class:`AsIs`)
``(CALL, uid, function, args, kwargs)``         reply ``function(*args, **kwargs)``
``(MAP, uid, tid, chunk, star)``                reply ``[f(*x) if star else f(x) for x in chunk]``
                                                where ``f`` is definition *tid* (a Task's work)
``(MR_MAP, uid, tid, chunk, run)``              run MapReduce *tid*'s map (and combine) over
                                                *chunk*, keep the pairs here under *run* (one
                                                run of the job), reply how many keys it holds
``(GANG, uid, tid, members, args)``             with the other *members* (world ranks), run gang
                                                task *tid*; gang rank 0 replies its result
``(MR_REDUCE, uid, tid, members, run)``         with the other *members*: shuffle the pairs of
                                                *run* (alltoallv), reduce this rank's keys,
                                                reply them as a dict
``(FORGET, run)``                               drop the pairs kept for MapReduce *run* (no reply)
``(LOAD, spec)``                                load the task file of a job submitted to a
                                                running service (a ``TargetSpec``; no reply)
``(RESTART,)``                                  an isolated worker starts a new child process
                                                for its next unit (no reply)
``(STOP, uid, exit_process)``                   reply ``None`` and leave the serve loop; with
                                                *exit_process*, end the process at once (ranks
                                                were lost: MPI_Finalize would wait for them)
==============================================  =================================================

A reply is ``(uid, ok, value, seconds)``: on success *value* is the result,
otherwise a :class:`Failure`; *seconds* is the worker time the unit took.
On the wire *value* is pickled on its own, so a value that cannot be
unpickled on rank 0 fails its one unit, and its large buffers (numpy
arrays' data) follow as *buffers*. The other messages are typed records
(NamedTuples), sent as plain tuples: :func:`encode` and :func:`decode`.

Commands and replies are pickled with their large buffers out of band
(:func:`pydra.comm.serial.dumps_oob`): their encoders return the pickle
and the buffers, which :mod:`pydra.comm.mpi` sends as MPI messages of
their own, and their decoders take both. The other messages have none.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, Sequence, TypeVar, Union

from pydra.comm import serial
from pydra.errors import RemoteTraceback, user_traceback


class AsIs(NamedTuple):
    """A definition for rank 0 in a one-process job, which runs its units itself: the object, not its pickle.

    Nothing there is pickled (as a call's arguments are not), so a lambda
    works in ``Executor.map`` too; it never goes on the wire.
    """

    obj: Any


class Tag(IntEnum):
    """The MPI tag of each kind of message (see the table above)."""

    COMMANDS = 11
    REPLIES = 12
    PROGRESS = 13
    CANCEL = 14
    HEARTBEAT = 15
    LOG = 16
    BOUNCED = 17


#: what each tag carries, for log lines about dropped messages
TAG_NAMES = {tag.value: tag.name.lower() for tag in Tag}


DEFINE = "define"
CALL = "call"
MAP = "map"
MR_MAP = "mr_map"
GANG = "gang"
MR_REDUCE = "mr_reduce"
FORGET = "forget"
LOAD = "load"
RESTART = "restart"
STOP = "stop"

#: a received pickle
Payload = Union[bytes, bytearray, memoryview]

#: commands that get no reply (every other command gets exactly one)
NO_REPLY = frozenset({DEFINE, FORGET, LOAD, RESTART})
#: commands whose third field is a definition id: the worker must have received it first
USES_DEFINITION = frozenset({MAP, MR_MAP, GANG, MR_REDUCE})


# -- the hot path: commands and replies, plain tuples -----------------------------------------------


def encode_commands(commands: list[tuple]) -> tuple[bytes, list]:
    """A COMMANDS payload and its out-of-band buffers (raises what pickle raises: the caller fails those units).

    A CALL's plain numpy arguments and large ``bytes`` go in their wire form (:func:`pydra.comm.serial.compact`).
    """
    return serial.dumps_oob(_compact_calls(commands))


def _compact_calls(commands: list[tuple]) -> list[tuple]:
    """*commands*, or a copy with the plain arrays and large bytes of its CALLs compacted (0.1 µs a command)."""
    ndarray, large = serial.array_type(), serial.OUT_OF_BAND_BYTES
    for command in commands:
        if command[0] == CALL:
            for arg in command[3]:
                if type(arg) is ndarray or type(arg) is bytes and len(arg) >= large:
                    return [_compact_call(command) if command[0] == CALL else command for command in commands]
    return commands


def _compact_call(command: tuple) -> tuple:
    kind, uid, function, args, kwargs = command
    return kind, uid, function, serial.compact_args(args), kwargs


def decode_commands(payload: Payload, buffers: Sequence = ()) -> list[tuple]:
    """The commands of a COMMANDS payload (raises what unpickling raised: the message bounces)."""
    return serial.loads(payload, buffers=buffers)


def pack_value(value: object) -> tuple[bytes, tuple]:
    """A reply's value pickled on its own (a plain numpy array in its short wire form), and its out-of-band buffers.

    Raises what pickle raises.
    """
    blob, buffers = serial.dumps_oob(serial.compact(value))
    return blob, tuple(buffers)


def encode_replies(read: int, packed: list[tuple]) -> tuple[bytes, list]:
    """A REPLIES payload and its buffers: *read* commands messages read so far, and the packed replies.

    Each packed reply is ``(uid, ok, blob, seconds, buffers)``, as :func:`pack_value` made *blob* and *buffers*.
    """
    return serial.dumps_oob((read, packed))


def decode_replies(payload: Payload, buffers: Sequence = ()) -> tuple[int, list[tuple]]:
    """*read* and the packed replies of a REPLIES payload (each value still pickled, beside its buffers)."""
    return serial.loads(payload, buffers=buffers)


# -- the other messages: typed records ---------------------------------------------------------------


class ProgressReport(NamedTuple):
    """PROGRESS: unit *uid* has done *done* of *total* (None: unknown), with an optional *message*."""

    uid: int
    done: int
    total: int | None
    message: str | None


class LogRecord(NamedTuple):
    """LOG: a record task code logged while running unit *uid* (None: outside a unit)."""

    uid: int | None
    created: float
    level: str
    logger: str
    message: str


class Usage(NamedTuple):
    """HEARTBEAT from a worker: its CPU seconds, resident bytes, OS threads, and its clock when measured."""

    cpu: float
    rss: int
    threads: int
    when: float


class Bounce(NamedTuple):
    """BOUNCED: the worker's commands message number *number* (counted from 0) did not unpickle there."""

    number: int
    failure: bytes  # a pickled Failure, on its own: it may not load on rank 0 either


Record = TypeVar("Record", ProgressReport, LogRecord, Usage, Bounce)


def encode(record: NamedTuple) -> bytes:
    """A record's payload: its fields as a plain tuple (no class name on the wire)."""
    return serial.dumps(tuple(record))


def decode(kind: type[Record], payload: bytes | bytearray) -> Record:
    """The record of type *kind* in *payload*."""
    return kind._make(serial.loads(payload))


def encode_cancel(uids: list[int]) -> bytes:
    """A CANCEL payload."""
    return serial.dumps(uids)


def decode_cancel(payload: bytes | bytearray) -> list[int]:
    return serial.loads(payload)


@dataclass(frozen=True)
class Failure:
    """An exception raised by user code on some rank, ready to travel to rank 0."""

    exception: BaseException
    traceback: str
    rank: int
    size: int
    host: str
    frames: bool = True  # whether *traceback* has a frame of the user's (see user_traceback)

    @classmethod
    def capture(cls, exception: BaseException, rank: int, size: int, host: str) -> "Failure":
        """Record *exception* for rank 0.

        It is kept as it is, ``SystemExit`` included (as ``concurrent.futures``
        does), unless it would not survive the trip: many exception classes
        pickle but cannot be rebuilt from their args, and those travel as a
        RuntimeError carrying their text. Its traceback starts at the user's
        first frame: the worker's own machinery above it is the same every time.
        """
        text, frames = user_traceback(exception)
        try:
            pickle.loads(pickle.dumps(exception))
        except Exception:
            exception = RuntimeError(f"{type(exception).__name__}: {exception} (cannot be rebuilt here, sent as text)")
        return cls(exception, text, rank, size, host, frames)

    @classmethod
    def here(cls, exception: BaseException) -> "Failure":
        """An error raised on rank 0 itself (pickling a call, unpickling a result): no remote traceback."""
        return cls(exception, "", 0, 0, "")

    @property
    def raised_here(self) -> bool:
        """Whether rank 0 raised it itself (:meth:`here`), not a task."""
        return self.size == 0

    def to_exception(self, note: str | None = None) -> BaseException:
        """The exception to raise on rank 0, with the remote traceback (if it has one) as its cause."""
        exception = self.exception
        if self.traceback:
            # In one process this is the very exception the task raised: its own traceback runs through the
            # runner's frames and repeats the user's, which the cause shows as a worker's does.
            exception.__traceback__ = None
            exception.__cause__ = RemoteTraceback(f"\nWorker {self.rank} of {self.size} on {self.host}\n{self.traceback}", self.frames)
        if note:
            exception.add_note(note)
        return exception
