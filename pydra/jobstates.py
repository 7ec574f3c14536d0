"""The states of a job and the moves allowed between them: one table for the service and the journal.

A job (a ``pydra run`` or a job of ``pydra serve``) is recorded in the
journal of its run directory (:mod:`pydra.journal`) and, in a service, kept
in :class:`pydra.service.Service`'s queue. Both move it only along
:data:`TRANSITIONS`: the service checks a request there before it changes
anything (and words its refusal from it), and the journal refuses, inside
the transaction that would record it, a move the table does not hold, so
the history of a job in ``transitions`` always reads as a path through it.

====================  =============================  ==================================
from                  to                             when
====================  =============================  ==================================
(new)                 queued                         submitted (``Journal.add_job``)
queued                running                        started
queued                cancelled                      cancelled before it started
running               done / failed / cancelled      finished, failed, cancelled
running               running                        ``pydra run --resume`` after rank 0 died
done, failed          running                        ``pydra run --resume``
failed, cancelled     queued                         the service's ``retry``
====================  =============================  ==================================
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable

__all__ = ["ACTIVE", "EDITABLE", "FINAL", "INITIAL", "TRANSITIONS", "JobState", "JobStateError",
           "allowed", "as_state", "check_move", "sources_of", "describe_states"]


class JobState(str, Enum):
    """What became of a job so far; the value is what the journal stores and the service shows."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value  # str(state) in messages, as with the plain strings it replaced

    @property
    def final(self) -> bool:
        """Whether the job has finished (the journal sets its ``finished`` time)."""
        return self in FINAL


_Q, _R, _D, _F, _C = JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED

#: the state of a job just submitted
INITIAL = _Q
#: states in which a job has finished
FINAL = frozenset({_D, _F, _C})
#: states a service waits for before it shuts down (and ``jobs`` lists without ``--all``)
ACTIVE = frozenset({_Q, _R})
#: states in which a job's request may still change (its priority)
EDITABLE = frozenset({_Q})

#: (from, to) -> why a job makes that move; no other move is allowed
TRANSITIONS: dict[tuple[JobState, JobState], str] = {
    (_Q, _R): "started",
    (_Q, _C): "cancelled before it started",
    (_R, _D): "finished",
    (_R, _F): "failed (or its target did not load)",
    (_R, _C): "cancelled while running",
    # rank 0 died with the job running, so its journal still says so: the resumed run starts again
    (_R, _R): "resumed (pydra run --resume) after rank 0 died",
    (_D, _R): "resumed (pydra run --resume): it recomputes nothing",
    (_F, _R): "resumed (pydra run --resume)",
    (_F, _Q): "retried (the service's retry)",
    (_C, _Q): "retried (the service's retry)",
}


class JobStateError(ValueError):
    """A job was asked to move between two states :data:`TRANSITIONS` does not link."""


def allowed(current: JobState | str, new: JobState | str) -> bool:
    """Whether a job in state *current* may move to *new* (plain strings are accepted)."""
    return (JobState(current), JobState(new)) in TRANSITIONS


def as_state(value: JobState | str) -> JobState:
    """*value* as a :class:`JobState`; :class:`JobStateError` naming the known states if it is none."""
    try:
        return JobState(value)
    except ValueError:
        known = ", ".join(state.value for state in JobState)
        raise JobStateError(f"unknown job state {value!r}: expected one of {known}") from None


def check_move(current: JobState | str, new: JobState | str, job: int | None = None) -> JobState:
    """*new* as a :class:`JobState`, if a job in *current* may move there; else raise :class:`JobStateError`."""
    current, new = as_state(current), as_state(new)
    if (current, new) not in TRANSITIONS:
        who = f"job {job}" if job is not None else "a job"
        raise JobStateError(f"{who} cannot go from {current} to {new}: only {describe_states(sources_of(new))} can")
    return new


def sources_of(new: JobState) -> tuple[JobState, ...]:
    """The states from which a job may move to *new*, in the order of :class:`JobState`."""
    return tuple(state for state in JobState if (state, new) in TRANSITIONS)


def describe_states(states: Iterable[JobState]) -> str:
    """``a queued or running job``: *states* as words, for messages saying which jobs qualify."""
    names = [state.value for state in JobState if state in set(states)]
    if not names:
        return "no job"
    return "a " + (names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}") + " job"
