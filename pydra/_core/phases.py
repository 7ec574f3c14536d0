"""A worker's phases as rank 0's scheduler sees them, and the only moves between them.

:class:`~pydra._core.scheduler.Scheduler` keeps one :class:`Worker` per
worker rank; :data:`TRANSITIONS` lists every allowed move and the trigger
that makes it, and the scheduler's ``_move`` refuses any move not listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class _Member(Enum):
    """An enum whose members hash as the unique objects they are: ``Enum``'s own hash runs Python code
    (it hashes the name), and the scheduler hashes a phase or two per unit it deals and per reply."""

    __hash__ = object.__hash__


class Phase(_Member):
    """What a worker is doing, as rank 0 sees it."""

    IDLE = "idle"  # nothing in flight
    BUSY = "busy"  # units in flight
    RESERVED = "reserved"  # held for a gang: finishes what it has, takes nothing else
    GANG = "gang"  # runs a gang unit
    DRAINING = "draining"  # finishes what it has, then takes nothing (admin's drain)
    DRAINED = "drained"
    LOST = "lost"  # gone: gets nothing, its word no longer counts


class Trigger(_Member):
    """What moves a worker from one phase to another."""

    SENT = "units sent"
    EMPTIED = "its last unit in flight answered"
    HELD = "held for a gang"
    GANG = "gang unit sent"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    LOST = "lost"


_P, _T = Phase, Trigger
#: (phase, trigger) -> next phase; any move not listed is a bug (see Scheduler._move).
TRANSITIONS: dict[tuple[Phase, Trigger], Phase] = {
    (_P.IDLE, _T.SENT): _P.BUSY,
    (_P.BUSY, _T.SENT): _P.BUSY,
    (_P.BUSY, _T.EMPTIED): _P.IDLE,
    (_P.IDLE, _T.HELD): _P.RESERVED,
    (_P.BUSY, _T.HELD): _P.RESERVED,
    (_P.RESERVED, _T.HELD): _P.RESERVED,
    (_P.RESERVED, _T.EMPTIED): _P.RESERVED,  # its earlier units are done; the gang may start now
    (_P.RESERVED, _T.GANG): _P.GANG,
    # A gang that names its members (a MapReduce's reduce, among the ranks holding its pairs) may
    # want one that runs another gang, or drains: it is held once that is over.
    (_P.GANG, _T.HELD): _P.GANG,
    (_P.DRAINING, _T.HELD): _P.DRAINING,
    (_P.DRAINED, _T.HELD): _P.RESERVED,
    (_P.GANG, _T.EMPTIED): _P.IDLE,
    (_P.GANG, _T.SENT): _P.GANG,  # STOP after a failed gang: it may never answer (see AbortIfStuck)
    (_P.IDLE, _T.DRAIN): _P.DRAINED,
    (_P.BUSY, _T.DRAIN): _P.DRAINING,
    (_P.DRAINING, _T.SENT): _P.DRAINING,  # STOP, RESTART and the like still reach it
    (_P.DRAINED, _T.SENT): _P.DRAINING,
    (_P.DRAINING, _T.EMPTIED): _P.DRAINED,
    (_P.DRAINING, _T.UNDRAIN): _P.BUSY,
    (_P.DRAINED, _T.UNDRAIN): _P.IDLE,
    **{(phase, _T.LOST): _P.LOST for phase in Phase if phase is not _P.LOST},
}
#: phases in which a worker may be given ordinary units
TAKES_WORK = frozenset({Phase.IDLE, Phase.BUSY})


@dataclass
class Worker:
    """What rank 0 knows about one worker."""

    rank: int
    host: str
    phase: Phase = Phase.IDLE
    #: units sent and not yet answered
    inflight: int = 0
    #: the gang unit it runs, if any
    gang_uid: int | None = None
    #: ids of the definitions it holds
    known: set = field(default_factory=set)
    units_done: int = 0
    failures: int = 0
    busy_seconds: float = 0.0
    #: when it was last heard from (any message counts as a heartbeat)
    last_heard: float = 0.0
    #: lost, and its process known to have ended (not merely silent)
    dead: bool = False
    #: (CPU seconds, resident bytes, OS threads, worker clock) from its last heartbeat,
    #: and the CPU share since the one before
    usage: tuple = (0.0, 0, 0, 0.0)
    cpu_percent: float | None = None

    @property
    def alive(self) -> bool:
        return self.phase is not Phase.LOST
