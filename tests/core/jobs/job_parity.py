"""pydra.Executor against what concurrent.futures promises; see tests/core/test_executor_parity.py.

    PARITY_TMP=DIR mpiexec -n 3 python tests/core/jobs/job_parity.py [CASE...]

Each case opens its own ``with pydra.Executor() as ex`` on every rank and
returns what rank 0 observed. Calls that must stay unfinished while rank 0
looks (``wait_for``) block until rank 0 creates a marker file in TMPDIR, so
no case depends on how fast the machine is; they live in $PARITY_TMP.
"""

from __future__ import annotations

import concurrent.futures
import gc
import io
import os
import pickle
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import core_jobkit
from mpi4py import MPI

import pydra

COMM = MPI.COMM_WORLD
TMP = Path(os.environ["PARITY_TMP"])
WORKERS = max(1, COMM.size - 1)
WAIT = 60  # seconds any wait of a case may take on a loaded machine


def session(body: Callable[[pydra.Executor], Any]) -> Any:
    with pydra.Executor() as ex:
        if ex is not None:
            return body(ex)
    return None


_markers = iter(range(1_000_000))


def marker() -> Path:
    """A fresh path for a marker file (rank 0 only)."""
    return TMP / f"marker-{os.getpid()}-{next(_markers)}"


def wait_for(path: str, limit: float = WAIT) -> bool:
    """Block until *path* exists (True) or *limit* seconds pass (False)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def fail_now(_=None):
    raise ValueError("failed at once")


def sleep_then(x, seconds=0.05):
    time.sleep(seconds)
    return x


def exit_one():
    sys.exit(1)


def hold_scheduler(ex, seconds: float = 0.5) -> None:
    """Keep rank 0's scheduler busy, so that the calls submitted next share one dispatch pass."""
    ex.master.call_soon(time.sleep, seconds)


# -- 1. a finished result never waits behind a later call of the same message -------------------


def reply_not_held(ex):
    go = marker()
    hold_scheduler(ex)
    quick = [ex.submit(abs, -i) for i in range(WORKERS)]  # one per worker, then one blocked call each:
    blocked = [ex.submit(wait_for, str(go), 30) for _ in range(WORKERS)]  # each worker gets both in one message
    done, not_done = concurrent.futures.wait(quick, timeout=WAIT)
    blocked_then = [f.done() for f in blocked]
    go.touch()
    return {"quick_done": len(done), "blocked_done_before_go": blocked_then,
            "blocked": [f.result(timeout=WAIT) for f in blocked]}


def wait_modes(ex):
    go = marker()
    # The blocked call goes last: with one worker (one process) the others would wait behind it.
    quick, failing, blocked = ex.submit(abs, -3), ex.submit(fail_now), ex.submit(wait_for, str(go))
    first_exception = concurrent.futures.wait([failing, blocked], WAIT, concurrent.futures.FIRST_EXCEPTION)
    first_completed = concurrent.futures.wait([quick, blocked], WAIT, concurrent.futures.FIRST_COMPLETED)
    timed_out = concurrent.futures.wait([blocked], timeout=0.2)
    go.touch()
    all_completed = concurrent.futures.wait([failing, blocked, quick], WAIT, concurrent.futures.ALL_COMPLETED)
    return {
        "first_exception": [failing in first_exception.done, blocked in first_exception.not_done],
        "first_completed": [quick in first_completed.done, blocked in first_completed.not_done],
        "timed_out": [len(timed_out.done), len(timed_out.not_done)],
        "all_completed": [len(all_completed.done), len(all_completed.not_done)],
        "values": [type(failing.exception()).__name__, blocked.result(), quick.result()],
    }


def as_completed_timeout(ex):
    go = marker()
    quick, blocked = ex.submit(abs, -2), ex.submit(wait_for, str(go))
    seen = []
    try:
        for future in concurrent.futures.as_completed([blocked, quick], timeout=1.0):
            seen.append(future.result())
    except TimeoutError:
        seen.append("TimeoutError")
    go.touch()
    rest = [f.result() for f in concurrent.futures.as_completed([blocked, quick], timeout=WAIT)]
    return {"seen": seen, "rest": sorted(map(str, rest))}


def cancel(ex):
    go = marker()
    running = [ex.submit(wait_for, str(go)) for _ in range(2 * WORKERS)]  # every worker's pipeline is full
    time.sleep(0.5)  # let them be sent: a call handed to a worker is running, and cannot be cancelled
    queued = ex.submit(abs, -7)
    outcome = {"queued_cancel": queued.cancel(), "queued_cancelled": queued.cancelled(),
               "running_cancel": running[0].cancel()}
    go.touch()
    try:
        queued.result(timeout=WAIT)
    except concurrent.futures.CancelledError:
        outcome["queued_result"] = "CancelledError"
    outcome["running"] = [f.result(timeout=WAIT) for f in running]
    outcome["after"] = ex.submit(abs, -8).result(timeout=WAIT)
    return outcome


# -- 2. shutdown(wait=False) and cancel_futures ----------------------------------------------------


def shutdown_nowait(ex):
    futures = [ex.submit(sleep_then, i) for i in range(20)]
    mapped = ex.map(sleep_then, range(20))
    ex.shutdown(wait=False)
    returned_early = not all(f.done() for f in futures)
    try:
        ex.submit(abs, 1)
        refused = None
    except RuntimeError as exc:
        refused = str(exc)
    return {"returned_early": returned_early, "futures": [f.result(timeout=WAIT) for f in futures],
            "mapped": list(mapped), "refused": refused}


def shutdown_cancel(ex):
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    return {"cancelled_some": len(cancelled) > 0, "others_ran": len(others) > 0,
            "all_done": all(f.done() for f in futures), "others_ok": all(f.exception() is None for f in others)}


def shutdown_cancel_wait(ex):
    """Calls cancelled by shutdown(cancel_futures=True) count as done for wait(), while others still run."""
    go = marker()
    running = [ex.submit(wait_for, str(go)) for _ in range(2 * WORKERS)]
    time.sleep(0.5)  # handed to the workers: running
    queued = [ex.submit(abs, -i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    done, not_done = concurrent.futures.wait(queued, timeout=WAIT)
    running_then = [f.done() for f in running]
    go.touch()
    return {"queued_done": len(done), "queued_cancelled": all(f.cancelled() for f in queued),
            "running_done_before_go": running_then, "running": [f.result(timeout=WAIT) for f in running]}


def shutdown_twice(ex):
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(wait=False)
    ex.shutdown(wait=True, cancel_futures=True)
    return {"cancelled_some": any(f.cancelled() for f in futures), "all_done": all(f.done() for f in futures)}


def shutdown_cancel_map(ex):
    results = ex.map(sleep_then, range(200))
    first = next(results)
    ex.shutdown(wait=False, cancel_futures=True)
    got = [first]
    try:
        got.extend(results)
        error = None
    except concurrent.futures.CancelledError:
        error = "CancelledError"
    return {"prefix_ok": got == list(range(len(got))), "short": len(got) < 200, "error": error}


# -- 3. and 5. pickling failures both ways --------------------------------------------------------


def _only_on_rank_0() -> type:
    """A class whose module exists on rank 0 only, as a class defined in an interactive session."""
    module = types.ModuleType("only_on_rank_0")

    class Local:
        pass

    Local.__module__, Local.__qualname__ = module.__name__, "Local"
    module.Local = Local
    sys.modules[module.__name__] = module
    return Local


def _raise(error_type, *args):
    raise error_type(*args)


class ExitAtUnpickle:
    def __reduce__(self):
        return (_raise, (SystemExit, 1))


class ErrorAtUnpickle:
    def __reduce__(self):
        return (_raise, (pickle.UnpicklingError, "error at unpickle"))


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(1)


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("error at pickle")


def return_instance(cls):
    return cls()


def outcome(future) -> str:
    error = future.exception(timeout=WAIT)
    return type(error).__name__ if error is not None else f"value {type(future.result()).__name__}"


def unloadable_arguments(ex):
    local = _only_on_rank_0()
    hold_scheduler(ex)
    # Each bad call shares its message with good ones: only the bad one may fail.
    bad = [ex.submit(id, local()), ex.submit(id, ExitAtUnpickle()), ex.submit(id, ErrorAtUnpickle())]
    good = [ex.submit(abs, -i) for i in range(4 * WORKERS)]
    return {"bad": [outcome(f) for f in bad], "good": [f.result(timeout=WAIT) for f in good],
            "lost": [w["rank"] for w in ex.statistics()["workers"] if w["state"] == "lost"],
            "after": list(ex.map(abs, [-1, -2]))}


def result_pickling(ex):
    futures = [ex.submit(return_instance, cls) for cls in (ExitAtPickle, ErrorAtPickle)]
    exits = ex.submit(exit_one)
    return {"results": [outcome(f) for f in futures], "task_exit": outcome(exits),
            "exit_code": getattr(exits.exception(), "code", None),
            "lost": [w["rank"] for w in ex.statistics()["workers"] if w["state"] == "lost"],
            "after": ex.submit(abs, -9).result(timeout=WAIT)}


def argument_pickling(ex):
    future = ex.submit(id, ErrorAtPickle())
    return {"argument": outcome(future), "cause": repr(future.exception().__cause__) if future.exception() else None,
            "after": ex.submit(abs, -4).result(timeout=WAIT)}


def result_unpickling(ex):
    """Results whose unpickling on rank 0 raises: that call fails with what was raised, the job goes on."""
    futures = [ex.submit(return_instance, cls) for cls in (ExitAtUnpickle, ErrorAtUnpickle)]
    return {"results": [outcome(f) for f in futures], "after": ex.submit(abs, -5).result(timeout=WAIT)}


# -- 6. exception hooks --------------------------------------------------------------------------


def hooks_untouched(ex):
    untouched = [sys.excepthook is sys.__excepthook__, threading.excepthook is threading.__excepthook__]
    captured = io.StringIO()
    real_stderr, sys.stderr = sys.stderr, captured
    try:
        try:
            raise KeyError("shown, not fatal")
        except KeyError:
            sys.excepthook(*sys.exc_info())  # what IPython and some loggers do
        thread = threading.Thread(target=fail_now, name="users-thread")
        thread.start()
        thread.join()
    finally:
        sys.stderr = real_stderr
    text = captured.getvalue()
    return {"untouched": untouched, "printed": ["shown, not fatal" in text, "failed at once" in text],
            "after": ex.submit(abs, -6).result(timeout=WAIT)}


def hooks_after_session():
    session(lambda ex: ex.submit(abs, 1).result(timeout=WAIT))
    return [sys.excepthook is sys.__excepthook__, threading.excepthook is threading.__excepthook__]


# -- 7. weak references ---------------------------------------------------------------------------


class Holder:
    """A weakly referenceable object, for the reference checks."""

    def method(self):
        return 1


def make_holder(_x):
    return Holder()


def remember(obj, go: str, report: str) -> None:
    """On a worker: once *go* exists, write to *report* whether *obj* (an argument) was freed."""
    ref = weakref.ref(obj)

    def check() -> None:
        wait_for(go)
        deadline = time.monotonic() + 10
        while ref() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        # Written whole, then renamed: the reader waits for the file to exist, and read it empty once.
        Path(report + ".partial").write_text("kept" if ref() is not None else "freed")
        os.replace(report + ".partial", report)

    threading.Thread(target=check, daemon=True).start()


def weak_references(ex):
    freed_values = []
    for value in ex.map(make_holder, range(5)):
        ref = weakref.ref(value)
        del value
        gc.collect()
        freed_values.append(ref() is None)
    holder = Holder()
    collected = threading.Event()
    ref = weakref.ref(holder, lambda _: collected.set())
    ex.submit(holder.method)  # the future is dropped on purpose
    del holder
    deadline = time.monotonic() + WAIT
    while not collected.is_set() and time.monotonic() < deadline:
        gc.collect()
        collected.wait(0.05)
    go, report = marker(), marker()
    ex.submit(remember, Holder(), str(go), str(report)).result(timeout=WAIT)
    go.touch()
    wait_for(str(report))
    return {"map_values_freed": freed_values, "submitted_freed": collected.is_set(),
            "worker_argument": report.read_text() if report.exists() else "no report"}


# -- 10. the serializer (run with PYDRA_SERIALIZER=cloudpickle) -----------------------------------


def lambdas(ex):
    k = 10
    adder = lambda x: x + k  # noqa: E731
    made = ex.submit(lambda n: (lambda y: y * n), 3).result(timeout=WAIT)  # a closure made on a worker
    return {
        "submit": ex.submit(adder, 1).result(timeout=WAIT),
        "map": list(ex.map(lambda x: x * k, range(5))),
        "map_none": sum(ex.map(adder, range(1000), chunksize=None)),
        "closure_result": made(7),
        "task": ex.submit_task(pydra.Parallel(lambda x: -x), 1, 2).result(timeout=WAIT),
    }


CASES = {
    "reply_not_held": lambda: session(reply_not_held),
    "wait_modes": lambda: session(wait_modes),
    "as_completed_timeout": lambda: session(as_completed_timeout),
    "cancel": lambda: session(cancel),
    "shutdown_nowait": lambda: session(shutdown_nowait),
    "shutdown_cancel": lambda: session(shutdown_cancel),
    "shutdown_twice": lambda: session(shutdown_twice),
    "shutdown_cancel_wait": lambda: session(shutdown_cancel_wait),
    "shutdown_cancel_map": lambda: session(shutdown_cancel_map),
    "unloadable_arguments": lambda: session(unloadable_arguments),
    "result_pickling": lambda: session(result_pickling),
    "argument_pickling": lambda: session(argument_pickling),
    "result_unpickling": lambda: session(result_unpickling),
    "hooks_untouched": lambda: session(hooks_untouched),
    "hooks_after_session": hooks_after_session,
    "weak_references": lambda: session(weak_references),
    "lambdas": lambda: session(lambdas),
}

if __name__ == "__main__":
    core_jobkit.main(CASES, deadline=120)
