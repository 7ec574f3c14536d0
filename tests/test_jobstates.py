"""The states of a job and their moves: one table (pydra/jobstates.py), which the journal enforces.

No MPI here: the table itself, the words the service's refusals are made
of, and the journal refusing (inside its transaction, writing nothing) a
move the table does not hold while taking every move it does. The service's
own checks are exercised over a live master in tests/core/test_jobs.py.
"""

from __future__ import annotations

import itertools

import pytest

from pydra import jobstates
from pydra.jobstates import (ACTIVE, EDITABLE, FINAL, INITIAL, TRANSITIONS, JobState, JobStateError, allowed,
                             check_move, describe_states, sources_of)
from pydra.journal import STATES, Journal

Q, R, D, F, C = JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED

#: the table as the docs and the service promise it, written out a second time on purpose
EXPECTED = {
    (Q, R), (Q, C),
    (R, D), (R, F), (R, C), (R, R),
    (D, R),
    (F, R), (F, Q),
    (C, Q),
}


@pytest.fixture
def journal(tmp_path):
    with Journal.open(tmp_path / "run", create=True) as opened:
        yield opened


def test_the_states_are_the_journals_and_show_as_their_names():
    assert STATES == ("queued", "running", "done", "failed", "cancelled")
    assert [state.value for state in JobState] == list(STATES)
    assert str(D) == f"{D}" == "done" and D == "done"
    assert INITIAL is Q and FINAL == {D, F, C} and ACTIVE == {Q, R} and EDITABLE == {Q}
    assert [state.final for state in JobState] == [False, False, True, True, True]


@pytest.mark.parametrize(("current", "new"), list(itertools.product(JobState, repeat=2)), ids=str)
def test_every_move_is_allowed_exactly_when_the_table_holds_it(current, new):
    assert allowed(current, new) is ((current, new) in EXPECTED)
    assert allowed(current.value, new.value) is ((current, new) in EXPECTED)  # plain strings too
    if (current, new) in EXPECTED:
        assert check_move(current, new.value) is new
    else:
        with pytest.raises(JobStateError, match=f"cannot go from {current} to {new}"):
            check_move(current, new)


def test_the_table_says_why_for_every_move_and_reaches_every_state():
    assert set(TRANSITIONS) == EXPECTED
    assert all(isinstance(why, str) and why for why in TRANSITIONS.values())
    reached, frontier = {INITIAL}, [INITIAL]
    while frontier:
        state = frontier.pop()
        for current, new in TRANSITIONS:
            if current is state and new not in reached:
                reached.add(new)
                frontier.append(new)
    assert reached == set(JobState)
    # A finished job moves only to run again: resumed (running) or retried (queued).
    assert {new for current, new in TRANSITIONS if current.final} == {Q, R}


def test_refusals_are_worded_from_the_table():
    assert describe_states(sources_of(C)) == "a queued or running job"
    assert describe_states(sources_of(Q)) == "a failed or cancelled job"
    assert describe_states(sources_of(R)) == "a queued, running, done or failed job"
    assert describe_states(EDITABLE) == "a queued job"
    assert describe_states([]) == "no job"
    with pytest.raises(JobStateError) as refused:
        check_move(D, C, job=7)
    assert str(refused.value) == "job 7 cannot go from done to cancelled: only a queued or running job can"
    assert isinstance(refused.value, ValueError)  # what callers of Journal.set_state caught before
    with pytest.raises(JobStateError, match="unknown job state 'finished': expected one of queued, running, done"):
        check_move(R, "finished")
    with pytest.raises(JobStateError, match="unknown job state 'paused'"):
        jobstates.as_state("paused")


def test_the_journal_takes_every_move_of_the_table(journal):
    # queued -> cancelled -> queued -> running -> failed -> queued -> running -> running (rank 0 died)
    # -> done -> running (resumed) -> cancelled
    job = journal.add_job("t.py:T", [], {}, None)
    path = [C, Q, R, F, Q, R, R, D, R, C]
    for state in path:
        journal.set_state(job, state)
    assert [state for state, _ in journal.transitions(job)] == [INITIAL.value, *(state.value for state in path)]
    assert journal.job(job)["state"] == "cancelled"


@pytest.mark.parametrize(("reach", "refused"), [
    ([], D),  # a queued job cannot be done without running
    ([], F),
    ([R, D], Q),  # a done job is not retried
    ([R, D], C),
    ([C], R),  # a cancelled job is retried (queued) before it runs again
    ([R, F], C),
])
def test_the_journal_refuses_a_move_outside_the_table_and_writes_nothing(journal, reach, refused):
    job = journal.add_job("t.py:T", [], {}, None)
    for state in reach:
        journal.set_state(job, state)
    before, transitions = journal.job(job), journal.transitions(job)
    with pytest.raises(JobStateError, match=f"job {job} cannot go from {before['state']} to {refused}"):
        journal.set_state(job, refused, error="should not be stored", result_path="/nowhere")
    assert journal.job(job) == before
    assert journal.transitions(job) == transitions
    assert journal.failed is None  # the caller's mistake: the journal goes on
    journal.set_state(job, R if before["state"] != "cancelled" else Q)


def test_the_journal_still_refuses_unknown_states_and_jobs_first(journal):
    job = journal.add_job("t.py:T", [], {}, None)
    with pytest.raises(ValueError, match="unknown job state 'finished'"):
        journal.set_state(job, "finished")
    with pytest.raises(KeyError, match="no job 42"):
        journal.set_state(42, "done")  # no such job, whatever the move
