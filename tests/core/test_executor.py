"""pydra.Executor behaves as a concurrent.futures.Executor over the ranks, and no rank can hang the job.

tests/core/jobs/job_executor.py runs every case in one job per rank count
(in-process, 2 and 3 ranks): submit/result (with keyword arguments),
as_completed/wait, map with chunksize 1, 7 and None and with several
iterables (equal to builtin map, which stops at the shortest), map over a
generator and over nothing, the map timeout, a worker's exception re-raised
with its "Worker r of n on host" traceback as __cause__, workers getting None
from ``with``, an endless generator consumed partially then abandoned with
the session still usable, submit_task, shutdown, an unpicklable function, and
two slow calls spreading over two idle workers.

tests/core/jobs/job_abort.py: an uncaught exception on one rank, outside
Pydra's own error handling, makes the job exit non-zero promptly instead of
hanging.
"""

from __future__ import annotations

import pytest
from mpijobs import IN_PROCESS, CaseCache, Finished, run_script, workers_of, rank_params
from mpijobs import workloads as w

EXPECTED = {
    "submit_result": {"pow": [i**2 for i in range(20)], "keyword": 255},
    "map_chunksize_1": list(map(w.square, w.ITEMS)),
    "map_chunksize_none": list(map(w.square, range(5000))),
    "map_chunksize_7": list(map(w.square, range(100))),
    "map_multiple_iterables": list(map(pow, range(30), [2] * 25)),
    "map_multiple_iterables_none": list(map(w.add_mul, range(3000), range(3, 4000))),
    "map_generator": list(map(w.inc, range(300))),
    "map_empty": [],
    "submit_task": {"parallel": [w.square(x) for x in w.ITEMS], "sequence": 55},
    "shutdown": {"first": 16, "done": True, "refused": "cannot schedule new futures after shutdown"},
}

CASES = [
    *EXPECTED,
    "futures_api",
    "workers_get_none",
    "map_timeout",
    "submit_exception",
    "map_exception",
    "endless_chunksize_1",
    "endless_chunksize_none",
    "slow_consumer",
    "unpicklable_map",
    "unpicklable_argument",
    "enter_twice",
    "intercomm_refused",
    "spread",
    "submit_from_threads",
    "unpicklable_result",
    "unpicklable_exception",
    "unloadable_result",
    "settled_call_lets_go",
    "ctrl_c_while_waiting",
    "user_handler_while_waiting",
]
executor_jobs = CaseCache("job_executor.py", CASES)
# A caller drives while replies keep coming within PYDRA_SPIN_SECONDS (0.5 ms by default). Open MPI with
# its oversubscribe mapping (mpi_environment's) leaves ranks unbound: with one busy process beside the job
# on this 2-core machine a lone round trip took 0.6-1 ms (0.1 ms without it), so nearly every call was
# handed back. These jobs give the caller 5 ms, so that the test holds on a loaded machine.
lone_call_jobs = CaseCache("job_executor.py", ["lone_calls"])
LONE_CALL_SPIN = {"PYDRA_SPIN_SECONDS": "0.005"}

RANKS = rank_params(IN_PROCESS, 2, 3)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_results_equal_serial(case: str, ranks: int) -> None:
    assert executor_jobs(ranks).ok(case) == EXPECTED[case]


@pytest.mark.parametrize("ranks", RANKS)
def test_futures_work_with_concurrent_futures_helpers(ranks: int) -> None:
    got = executor_jobs(ranks).ok("futures_api")
    assert got == {"done": {i: i * i for i in range(10)}, "all_done": 10, "not_done": 0}


@pytest.mark.parametrize("ranks", RANKS)
def test_workers_get_none_from_with(ranks: int) -> None:
    got = executor_jobs(ranks).ok("workers_get_none")
    assert got == ["executor"] + ["None"] * (max(1, ranks) - 1)


@pytest.mark.parametrize("ranks", RANKS)
def test_map_timeout_raises_timeout_error(ranks: int) -> None:
    got = executor_jobs(ranks).ok("map_timeout")
    assert got["raised"] == "TimeoutError"
    assert got["after"] == [1, 2, 3, 4, 5]  # the session still works


@pytest.mark.parametrize("ranks", RANKS)
def test_submit_exception_has_worker_traceback(ranks: int) -> None:
    got = executor_jobs(ranks).ok("submit_exception")
    error = got["error"]
    assert error is not None, "the future's result() did not raise"
    assert (error["type"], error["message"]) == ("ValueError", "item 13 is unlucky")
    assert error["cause_type"] == "RemoteTraceback"
    size = max(1, ranks)
    worker = 0 if ranks <= 1 else 1
    assert error["cause"].lstrip("\n").startswith(f"Worker {worker} of {size} on ")
    assert "fails_on_13" in error["cause"] and 'raise ValueError(f"item {x} is unlucky")' in error["cause"]
    assert got["after"] == 144
    # The user's frame once, in the cause: in one process too, where the exception is the very one raised
    # (its own traceback, through the runner's frames, is not shown twice).
    assert (got["user_frames"], got["pydra_core_frames"]) == (1, 0)


@pytest.mark.parametrize("ranks", RANKS)
def test_map_exception_after_the_good_results(ranks: int) -> None:
    """As concurrent.futures promises, map's iterator raises a call's exception when it reaches that
    call's position: results 0..12 come first even when item 13 fails before item 12 finishes."""
    got = executor_jobs(ranks).ok("map_exception")
    assert got["seen"] == list(range(13))
    assert got["error"]["type"] == "ValueError" and got["error"]["message"] == "item 13 is unlucky"
    assert f" of {max(1, ranks)} on " in got["error"]["cause"]
    assert got["after"] == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("chunksize", ["1", "none"])
@pytest.mark.parametrize("ranks", RANKS)
def test_endless_generator_abandoned_then_more_work(ranks: int, chunksize: str) -> None:
    got = executor_jobs(ranks).ok(f"endless_chunksize_{chunksize}")
    assert got["taken_ok"]
    assert 1000 <= got["pulled"] < 5_000_000  # lazily pulled: never run away to the end of time
    assert got["after"] == {
        "map": [i + 1 for i in range(100)],
        "submit": 42,
        "task": [i * i for i in range(10)],
    }


@pytest.mark.parametrize("ranks", RANKS)
def test_paused_reader_bounds_read_ahead(ranks: int) -> None:
    """A reader that takes 10 results and pauses 1 s: rank 0 must not keep pulling (and buffering
    the results of) millions of items it has no one to hand to."""
    got = executor_jobs(ranks).ok("slow_consumer")
    assert got["first"] == [i * i for i in range(10)]
    assert got["pulled"] < 1_000_000, f"{got['pulled']} items pulled for 10 results read"


@pytest.mark.parametrize("ranks", RANKS)
def test_unpicklable_function_raises_instead_of_hanging(ranks: int) -> None:
    """map(lambda ...) cannot ship the lambda: the caller must get that error, not wait forever
    (the case uses timeout=3, so a hang shows up as TimeoutError). In one process nothing is
    pickled, so the lambda simply runs, as submit's does."""
    got = executor_jobs(ranks).ok("unpicklable_map")
    if ranks == IN_PROCESS:
        assert got == {"raised": None, "value": [2, 3]}, got
        return
    assert got["raised"] is not None and got["raised"] != "TimeoutError", got
    assert "pickle" in got["message"].lower()
    assert got["after"] == 3


@pytest.mark.parametrize("ranks", RANKS)
def test_a_pickling_error_fails_its_own_call_as_itself(ranks) -> None:
    """The caller gets pickle's own exception (so `except pickle.PicklingError` works), and a call
    that shared the message with it still runs (issue 10, item 4). Its notes say where it failed
    (on rank 0, not on a worker) and what would send a lambda, and no other error is chained to it."""
    got = executor_jobs(ranks).ok("unpicklable_argument")
    assert got["good"] == 5
    if ranks == IN_PROCESS:  # nothing is pickled in one process: abs(lambda) fails as abs's TypeError
        assert got["raised"] == "TypeError", got
    else:
        assert got["raised"] == "PicklingError", got
        assert any("while sending work to rank" in note for note in got["notes"]), got
        assert any("set PYDRA_SERIALIZER=cloudpickle" in note for note in got["notes"]), got
        assert not any(" on rank " in note for note in got["notes"]) and not got["chained"], got


@pytest.mark.parametrize("ranks", RANKS)
def test_entering_an_executor_twice_is_refused(ranks) -> None:
    got = executor_jobs(ranks).ok("enter_twice")
    assert got == {"raised": "this executor has already been entered; make a new one", "after": 4}


@pytest.mark.parametrize("ranks", [2, 3])
def test_an_intercommunicator_is_refused(ranks) -> None:
    assert executor_jobs(ranks).ok("intercomm_refused") == ["expecting an intracommunicator"] * ranks


@pytest.mark.parametrize("ranks", [pytest.param(3, id="3-ranks")])
def test_two_slow_calls_use_two_idle_workers(ranks: int) -> None:
    """submit() twice with two idle workers: the calls run side by side, one per worker."""
    assert executor_jobs(ranks).ok("spread") == list(range(1, workers_of(ranks) + 1))


@pytest.mark.parametrize("ranks", RANKS)
def test_a_caller_waiting_for_a_lone_call_runs_the_scheduler_itself(ranks: int) -> None:
    """No thread hand-off on rank 0 for a lone call (Master.drive), where there are workers to poll.

    Most of the 200 calls are driven on a quiet machine; ten allows for a
    loaded one, where the scheduler thread may be mid-pass when a call waits.
    """
    got = lone_call_jobs(ranks, env=LONE_CALL_SPIN).ok("lone_calls")
    assert got["results"]
    if ranks == IN_PROCESS:
        assert got["driven"] == 0  # rank 0 runs the units itself: nothing to poll
    else:
        assert got["driven"] >= 10, got


@pytest.mark.parametrize("ranks", RANKS)
def test_ctrl_c_while_waiting_for_calls_harms_no_call(ranks: int) -> None:
    """A KeyboardInterrupt never lands in the middle of a scheduler pass the caller runs: every call completes."""
    assert executor_jobs(ranks).ok("ctrl_c_while_waiting") == {"interrupted": True, "settled": True, "after": True}


@pytest.mark.parametrize("ranks", RANKS)
def test_a_user_handler_that_raises_while_waiting_harms_no_call(ranks: int) -> None:
    """While another signal has a Python handler of the user's, the main thread leaves the scheduler to its thread."""
    got = executor_jobs(ranks).ok("user_handler_while_waiting")
    assert got == {"interrupted": True, "settled": True, "after": True, "driven meanwhile": 0}


@pytest.mark.parametrize("ranks", RANKS)
def test_submit_and_map_from_several_threads(ranks: int) -> None:
    assert executor_jobs(ranks).ok("submit_from_threads") == {0: True, 1: True, 2: True, 3: True}


@pytest.mark.parametrize("ranks", RANKS)
def test_unpicklable_result_is_a_task_error(ranks: int) -> None:
    got = executor_jobs(ranks).ok("unpicklable_result")
    assert got["after"] == 49
    if ranks > 1:  # in-process nothing is pickled, so the generator simply comes back
        # pickle's own exception, as concurrent.futures gives it, with a note naming the rank
        assert got["outcome"]["raised"] == "TypeError"
        assert "cannot pickle 'generator' object" in got["outcome"]["message"]
        assert "while sending a result from rank 1 to rank 0" in got["outcome"]["notes"]
        assert got["outcome"]["cause"].lstrip("\n").startswith(f"Worker 1 of {ranks} on ")


@pytest.mark.parametrize("ranks", RANKS)
def test_exception_that_cannot_be_rebuilt_still_reaches_the_caller(ranks: int) -> None:
    """``class E(Exception): __init__(self, code, detail)`` pickles but does not unpickle: rank 0 must
    still raise an error with its text and the worker's traceback, not abort the whole job."""
    got = executor_jobs(ranks).ok("unpicklable_exception")
    outcome = got["outcome"]
    assert outcome["raised"] is not None
    assert "code 7: two-argument exception" in outcome["message"]
    assert f" of {max(1, ranks)} on " in outcome["cause"]
    assert got["after"] == 81


@pytest.mark.parametrize("ranks", RANKS)
def test_result_that_cannot_be_unpickled_is_an_error_not_an_abort(ranks: int) -> None:
    got = executor_jobs(ranks).ok("unloadable_result")
    assert got["after"] == 64
    if ranks > 1:  # what unpickling raised, as itself (as mpi4py.futures), and no remote cause: it failed here
        assert got["outcome"]["raised"] == "RuntimeError"
        assert got["outcome"]["message"] == "this object cannot be unpickled"
        assert "while rank 0 unpickled a result from rank" in got["outcome"]["notes"]
        assert got["outcome"]["cause"] == ""


# -- an uncaught exception that ends a rank ends the job ------------------------------------------

ABORT_MODES = {
    "after_block": "raised after the executor block",
    "between_sessions": "raised between two sessions",
    "worker_after_session": "raised in its own code after serving",
    "rank0_inside_block": "rank 0 raised inside its with block",
    "task_keyboard_interrupt": "interrupted in a task on item 1",
    "task_sys_exit": "a task called sys.exit on item 1",
    "scheduler_fails": "an injected fault in the scheduler",
    "caller_drive_fails": "an injected fault in a pass run by a waiting caller",
}


def _abort_job(mode: str) -> Finished:
    return run_script(3, "job_abort.py", [mode], timeout=15)


@pytest.mark.parametrize("mode", list(ABORT_MODES))
def test_uncaught_exception_on_one_rank_ends_the_job(mode: str) -> None:
    finished = _abort_job(mode)
    assert "finished normally" not in finished.stdout
    assert finished.returncode != 0, finished.stderr[-2000:]
    assert ABORT_MODES[mode] in finished.stderr, finished.stderr[-2000:]
    if mode in ("scheduler_fails", "caller_drive_fails"):  # a fault of Pydra's own: it says so
        assert "internal error in rank 0's scheduler" in finished.stderr, finished.stderr[-2000:]


def test_a_thread_of_a_task_that_raises_is_reported_not_fatal() -> None:
    """As in any Python program, a thread's uncaught exception is printed and the program goes on."""
    finished = _abort_job("task_thread_raises")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "finished normally" in finished.stdout
    assert "a task's thread crashed on item 1" in finished.stderr


@pytest.mark.smoke
def test_uncaught_exception_after_block_ends_the_job_smoke() -> None:
    finished = _abort_job("after_block")
    assert finished.returncode != 0
    assert "rank 2 raised after the executor block" in finished.stderr


@pytest.mark.parametrize("ranks", RANKS)
def test_a_settled_future_lets_go_of_its_arguments(ranks: int) -> None:
    assert executor_jobs(ranks).ok("settled_call_lets_go") == {"freed": True, "still_held": True}
