"""What the scheduler hears and what it asks for: the events in and the instructions out.

:class:`~pydra._core.scheduler.Scheduler.handle` takes one event and returns
a list of instructions; the master (:mod:`pydra._core.master`) makes events
of messages and of the passing of time, and carries the instructions out
through its transport (:mod:`pydra._core.transport`). Times are the master's
``time.monotonic()``; tests use a clock of their own.
"""

from __future__ import annotations

from dataclasses import dataclass


# -- events (in) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time has passed: run due timers, check heartbeats, beat."""

    now: float


@dataclass(frozen=True)
class Dispatch:
    """Hand the workers with room their share of the waiting work."""

    now: float


@dataclass(frozen=True)
class RepliesReceived:
    """Replies ``(uid, ok, value or Failure, seconds, pickled value or None)`` from worker *rank*."""

    rank: int
    replies: list
    now: float


@dataclass(frozen=True)
class Heard:
    """Worker *rank* sent something other than replies (a heartbeat with its *usage*, progress, a log)."""

    rank: int
    now: float
    usage: tuple | None = None


@dataclass(frozen=True)
class Progress:
    """Unit *uid* on *rank* has done *done* of *total*."""

    rank: int
    uid: int
    done: int
    total: int | None
    message: str | None


@dataclass(frozen=True)
class WorkerGone:
    """Worker *rank* is lost for *reason* (its supervisor saw it die, an admin said so).

    *dead*: its process is known to have ended (MPI or its supervisor saw it),
    rather than merely given up on.
    """

    rank: int
    reason: str
    dead: bool = False


@dataclass(frozen=True)
class StopRequested:
    """Take no new work; once the submitted work is done, stop every worker."""


# -- instructions (out) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send *commands* to worker *rank* as one message (rank 0 itself runs them, in one process)."""

    rank: int
    commands: list


@dataclass(frozen=True)
class SendCancel:
    """Tell worker *rank* that the units *uids* are no longer wanted."""

    rank: int
    uids: list


@dataclass(frozen=True)
class Beat:
    """Send a heartbeat to each of *ranks*."""

    ranks: list


@dataclass(frozen=True)
class Lost:
    """Worker *rank* was declared lost: stop waiting for messages to it, say so."""

    rank: int
    host: str
    reason: str


@dataclass(frozen=True)
class TakeOver:
    """No worker is left: rank 0 runs the rest of the work itself from now on."""


@dataclass(frozen=True)
class NoWorkerLeft:
    """Every worker is lost and rank 0 may not take the work over (a service): the work waits for none."""


@dataclass(frozen=True)
class AbortIfStuck:
    """A gang failed and may have left ranks blocked in MPI: abort the job if STOP is not answered in time."""

    reason: str
    grace: float
