"""What rank 0 and the workers say to each other over MPI.

Rank 0 sends a worker ``TAG_COMMANDS`` messages, each a list of commands
(its share of a dispatch pass: several tiny units travel together). Every
unit command gets exactly one reply; the worker sends replies in
``TAG_REPLIES`` messages ``(messages read so far, [reply, ...])``, as soon as
one fails or has waited ``_HOLD_REPLIES_SECONDS`` (even while a later unit
runs), else when the message's last unit is done. Rank 0 counts each
worker's units in flight from those replies.

Commands are plain tuples because they sit on the hot path (a frozen
dataclass costs several times more to pickle); their layouts:

==============================================  =================================================
``(DEFINE, tid, blob)``                         unpickle *blob* (a task, function or subtree)
                                                and keep it under id *tid* for later commands
``(CALL, uid, function, args, kwargs)``         reply ``function(*args, **kwargs)``
``(MAP, uid, tid, chunk, star)``                reply ``[f(*x) if star else f(x) for x in chunk]``
                                                where ``f`` is definition *tid* (a Task's work)
``(MR_MAP, uid, tid, chunk, run)``              run MapReduce *tid*'s map (and combine) over
                                                *chunk*, keep the pairs here under *run* (one
                                                run of the job), reply their count
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
unpickled on rank 0 fails its one unit. A ``TAG_COMMANDS`` message that the
worker cannot unpickle (an argument whose class only rank 0 can import) comes
back whole as ``TAG_BOUNCED`` ``(payload, failure)``; rank 0 sends its units
again one per message, so that only the unit that cannot be loaded fails.
A progress report (``TAG_PROGRESS``) is ``(uid, done, total, message)``, a
cancellation (``TAG_CANCEL``) is a list of uids, a heartbeat
(``TAG_HEARTBEAT``, sent by a worker thread while the rank lives) is empty
from rank 0 and ``(cpu seconds, resident bytes, worker clock)`` from a
worker, and a log record (``TAG_LOG``) is ``(uid, time, level, logger,
message)``: what task code logged at WARNING and above (or the level the
task set) while running unit *uid*.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass

from pydra.errors import RemoteTraceback

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

#: commands that get no reply (every other command gets exactly one)
NO_REPLY = frozenset({DEFINE, FORGET, LOAD, RESTART})
#: commands whose third field is a definition id: the worker must have received it first
USES_DEFINITION = frozenset({MAP, MR_MAP, GANG, MR_REDUCE})


@dataclass(frozen=True)
class Failure:
    """An exception raised by user code on some rank, ready to travel to rank 0."""

    exception: BaseException
    traceback: str
    rank: int
    size: int
    host: str

    @classmethod
    def capture(cls, exception: BaseException, rank: int, size: int, host: str) -> "Failure":
        """Record *exception* for rank 0.

        It is kept as it is, ``SystemExit`` included (as ``concurrent.futures``
        does), unless it would not survive the trip: many exception classes
        pickle but cannot be rebuilt from their args, and those travel as a
        RuntimeError carrying their text.
        """
        text = "".join(traceback.format_exception(exception))
        try:
            pickle.loads(pickle.dumps(exception))
        except Exception:
            exception = RuntimeError(f"{type(exception).__name__}: {exception} (cannot be rebuilt here, sent as text)")
        return cls(exception, text, rank, size, host)

    @classmethod
    def here(cls, exception: BaseException) -> "Failure":
        """An error raised on rank 0 itself (pickling a call, unpickling a result): no remote traceback."""
        return cls(exception, "", 0, 0, "")

    def to_exception(self, note: str | None = None) -> BaseException:
        """The exception to raise on rank 0, with the remote traceback (if it has one) as its cause."""
        exception = self.exception
        if self.traceback:
            exception.__cause__ = RemoteTraceback(f"\nWorker {self.rank} of {self.size} on {self.host}\n{self.traceback}")
        if note:
            exception.add_note(note)
        return exception
