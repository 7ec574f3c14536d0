"""pydra.Executor keeps the promises of concurrent.futures (and, where the stdlib is silent, mpi4py.futures).

What CPython's and mpi4py's executor test suites check, written for an
executor over MPI ranks: every case of tests/core/jobs/job_parity.py runs in
one process and on 3 ranks (2 workers). Calls that must still be running
while rank 0 looks wait for a marker file, so nothing here depends on the
machine's speed.
"""

from __future__ import annotations

import sys

import pytest
from mpijobs import IN_PROCESS, CaseCache, mpi_environment, rank_params, run_process, run_script

RANKS = rank_params(IN_PROCESS, 3)
CASES = [
    "reply_not_held", "wait_modes", "as_completed_timeout", "cancel", "shutdown_nowait", "shutdown_cancel",
    "shutdown_twice", "shutdown_cancel_wait", "shutdown_cancel_map", "unloadable_arguments", "result_pickling",
    "argument_pickling", "result_unpickling",
    "hooks_untouched", "hooks_after_session", "weak_references",
]


_parity_jobs = {tuple(CASES): CaseCache("job_parity.py", CASES, timeout=600),
                ("lambdas",): CaseCache("job_parity.py", ["lambdas"], timeout=300)}


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("parity"))


@pytest.fixture
def parity(marker_dir):
    """Run (once per rank count and environment) the cases of job_parity.py; their outcomes."""

    def run(ranks: int, env: dict | None = None, cases: list[str] = CASES):
        return _parity_jobs[tuple(cases)](ranks, {"PARITY_TMP": marker_dir, **(env or {})})

    return run


# -- results as soon as they exist ------------------------------------------------------------------


@pytest.mark.parametrize("ranks", RANKS)
def test_a_result_does_not_wait_behind_a_later_call_in_its_message(ranks, parity) -> None:
    """Each worker gets a quick call and a blocked one in one message; the quick results arrive while
    the blocked calls wait for rank 0, which lets them go only once it has the quick results."""
    got = parity(ranks).ok("reply_not_held")
    workers = max(1, ranks - 1)
    assert got == {"quick_done": workers, "blocked_done_before_go": [False] * workers, "blocked": [True] * workers}


@pytest.mark.parametrize("ranks", RANKS)
def test_wait_in_its_three_modes(ranks, parity) -> None:
    got = parity(ranks).ok("wait_modes")
    assert got["first_exception"] == [True, True]  # the failed call done, the blocked one not
    assert got["first_completed"] == [True, True]
    assert got["timed_out"] == [0, 1]
    assert got["all_completed"] == [3, 0]
    assert got["values"] == ["ValueError", True, 3]


@pytest.mark.parametrize("ranks", RANKS)
def test_as_completed_yields_what_is_done_then_times_out(ranks, parity) -> None:
    assert parity(ranks).ok("as_completed_timeout") == {"seen": [2, "TimeoutError"], "rest": ["2", "True"]}


@pytest.mark.parametrize("ranks", RANKS)
def test_cancel_a_queued_call_but_not_a_running_one(ranks, parity) -> None:
    got = parity(ranks).ok("cancel")
    assert got["queued_cancel"] is True and got["queued_cancelled"] is True
    assert got["queued_result"] == "CancelledError"
    assert got["running_cancel"] is False
    assert got["running"] == [True] * len(got["running"])
    assert got["after"] == 8


# -- shutdown ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", RANKS)
def test_shutdown_without_wait_returns_at_once_and_loses_nothing(ranks, parity) -> None:
    got = parity(ranks).ok("shutdown_nowait")
    assert got["returned_early"]
    assert got["futures"] == list(range(20)) and got["mapped"] == list(range(20))
    assert got["refused"] == "cannot schedule new futures after shutdown"


@pytest.mark.parametrize("ranks", RANKS)
def test_shutdown_cancel_futures_cancels_what_no_worker_has(ranks, parity) -> None:
    assert parity(ranks).ok("shutdown_cancel") == {
        "cancelled_some": True, "others_ran": True, "all_done": True, "others_ok": True,
    }


@pytest.mark.parametrize("ranks", RANKS)
def test_a_second_shutdown_can_cancel_what_the_first_left_running(ranks, parity) -> None:
    assert parity(ranks).ok("shutdown_twice") == {"cancelled_some": True, "all_done": True}


@pytest.mark.parametrize("ranks", RANKS)
def test_calls_cancelled_by_shutdown_count_as_done_for_wait(ranks, parity) -> None:
    got = parity(ranks).ok("shutdown_cancel_wait")
    workers = 2 * max(1, ranks - 1)
    assert got == {"queued_done": 5, "queued_cancelled": True, "running_done_before_go": [False] * workers,
                   "running": [True] * workers}


@pytest.mark.parametrize("ranks", RANKS)
def test_shutdown_cancel_futures_ends_a_map_with_cancelled_error(ranks, parity) -> None:
    assert parity(ranks).ok("shutdown_cancel_map") == {"prefix_ok": True, "short": True, "error": "CancelledError"}


def test_an_executor_never_shut_down_runs_its_calls_at_exit(tmp_path) -> None:
    """Without ``with``: rank 0's script ends with calls pending; they run, the workers are let go."""
    for ranks in (IN_PROCESS, 3):
        out = tmp_path / f"calls-{ranks}.txt"
        finished = run_script(ranks, "job_no_with.py", [str(out)], timeout=120)
        assert finished.returncode == 0, finished.stderr[-2000:]
        assert sorted(out.read_text().splitlines()) == sorted(f"call {n}" for n in range(10))
        assert "lost" not in finished.stderr
        if ranks:
            assert finished.stdout.count("WORKER RELEASED") == ranks - 1


# -- pickling failures, both ways -------------------------------------------------------------------


@pytest.mark.parametrize("ranks", RANKS)
def test_an_argument_a_worker_cannot_unpickle_fails_only_its_call(ranks, parity) -> None:
    got = parity(ranks).ok("unloadable_arguments")
    if ranks > 1:  # a class only rank 0 can import; SystemExit and UnpicklingError raised while loading
        assert got["bad"] == ["ModuleNotFoundError", "SystemExit", "UnpicklingError"]
    assert got["good"] == list(range(len(got["good"])))
    assert got["lost"] == [] and got["after"] == [1, 2]


@pytest.mark.parametrize("ranks", RANKS)
def test_errors_while_a_worker_pickles_a_result_fail_that_call_as_themselves(ranks, parity) -> None:
    got = parity(ranks).ok("result_pickling")
    if ranks > 1:
        assert got["results"] == ["SystemExit", "PicklingError"]
    assert (got["task_exit"], got["exit_code"]) == ("SystemExit", 1)  # a task's sys.exit(1), as concurrent.futures
    assert got["lost"] == [] and got["after"] == 9


@pytest.mark.parametrize("ranks", RANKS)
def test_an_argument_rank_0_cannot_pickle_raises_pickles_own_error(ranks, parity) -> None:
    got = parity(ranks).ok("argument_pickling")
    if ranks > 1:  # raised here, on rank 0: no remote traceback as its cause
        assert got == {"argument": "PicklingError", "cause": "None", "after": 4}
    else:
        assert got == {"argument": "value int", "cause": None, "after": 4}


@pytest.mark.parametrize("ranks", RANKS)
def test_a_result_rank_0_cannot_unpickle_fails_its_call_with_what_was_raised(ranks, parity) -> None:
    got = parity(ranks).ok("result_unpickling")
    expected = ["SystemExit", "UnpicklingError"] if ranks > 1 else ["value ExitAtUnpickle", "value ErrorAtUnpickle"]
    assert got == {"results": expected, "after": 5}


# -- hooks and references ---------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", RANKS)
def test_exception_hooks_are_left_alone(ranks, parity) -> None:
    """sys.excepthook called by hand (IPython, loggers) and a crashing thread on rank 0 print, not abort."""
    got = parity(ranks).ok("hooks_untouched")
    assert got == {"untouched": [True, True], "printed": [True, True], "after": 6}
    assert parity(ranks).ok("hooks_after_session") == [True, True]


@pytest.mark.parametrize("ranks", RANKS)
def test_no_reference_outlives_its_use(ranks, parity) -> None:
    """map's iterator drops each value it yielded; a finished call's function and arguments are freed on
    rank 0 and on the worker, while the worker waits for its next message."""
    got = parity(ranks).ok("weak_references")
    assert got == {"map_values_freed": [True] * 5, "submitted_freed": True, "worker_argument": "freed"}


# -- the serializer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", RANKS)
def test_lambdas_and_closures_with_cloudpickle(ranks, parity) -> None:
    got = parity(ranks, env={"PYDRA_SERIALIZER": "cloudpickle"}, cases=["lambdas"]).ok("lambdas")
    assert got == {"submit": 11, "map": [0, 10, 20, 30, 40], "map_none": 509500, "closure_result": 21, "task": [-1, -2]}


def test_an_unknown_serializer_is_one_line() -> None:
    code = "import pydra\nwith pydra.Executor() as ex:\n    pass\n"
    finished = run_process([sys.executable, "-c", code], env=_env(PYDRA_SERIALIZER="nosuchmodule"))
    assert finished.returncode != 0
    assert "PYDRA_SERIALIZER='nosuchmodule': cannot import nosuchmodule" in finished.stderr


def _env(**extra: str) -> dict:
    env = mpi_environment()
    env.update(extra)
    return env
