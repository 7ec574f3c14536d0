"""pydra._core.worker: when a worker sends the replies of a commands message (tests/core/jobs/job_worker_replies.py)."""

from __future__ import annotations

from mpijobs import IN_PROCESS, result_line, run_script


def test_replies_go_at_half_the_message_on_a_failure_and_at_its_end():
    batches = result_line(run_script(IN_PROCESS, "job_worker_replies.py"))
    # Half the message's replies first, so that rank 0 refills the worker while it runs the rest.
    assert batches["ten"] == [5, 5]
    assert batches["one"] == [1]
    assert batches["seven_then_two"] == [3, 4, 1, 1]
    # A failure goes at once with what is held, and half the message still goes at its half.
    assert batches["failure_at_third"] == [3, 2, 5]
