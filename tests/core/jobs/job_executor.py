"""pydra.Executor as a concurrent.futures.Executor; see tests/core/test_executor.py.

    mpiexec -n 3 python tests/core/jobs/job_executor.py [CASE...]

Each case opens its own ``with pydra.Executor() as ex`` on every rank; rank 0
does the work and the case returns what rank 0 observed.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import core_jobkit
import core_workloads as w
from mpi4py import MPI

import pydra

COMM = MPI.COMM_WORLD


def session(body: Callable[[pydra.Executor], Any]) -> Any:
    """Run *body(ex)* on rank 0 inside a session; None on the other ranks."""
    with pydra.Executor() as ex:
        if ex is not None:
            return body(ex)
    return None


def fails_on_13(x):
    if x == 13:
        raise ValueError(f"item {x} is unlucky")
    return x


def fails_on_13_slow_12(x):
    """Item 12 takes a while, item 13 fails at once: on two workers 13's failure comes back first."""
    if x == 12:
        time.sleep(0.3)
    return fails_on_13(x)


def rank_of(_=None):
    return MPI.COMM_WORLD.rank


def describe(exc: BaseException) -> dict:
    return core_jobkit.describe(exc)


def submit_result(ex):
    futures = [ex.submit(pow, i, 2) for i in range(20)]
    keyword = ex.submit(int, "ff", base=16)
    return {"pow": [f.result(timeout=30) for f in futures], "keyword": keyword.result(timeout=30)}


def futures_api(ex):
    futures = {ex.submit(w.square, i): i for i in range(10)}
    done = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures, timeout=30)}
    waited = concurrent.futures.wait(list(futures), timeout=30)
    return {"done": done, "all_done": len(waited.done), "not_done": len(waited.not_done)}


def workers_get_none():
    with pydra.Executor() as ex:
        mine = "executor" if isinstance(ex, pydra.Executor) else repr(ex)
        if ex is not None:
            ex.submit(abs, -1).result()
    return COMM.gather(mine, root=0)


def intercomm_refused():
    """Every rank: an Executor over a real intercommunicator (even ranks <-> odd ranks) is a ValueError."""
    if COMM.size < 2:
        return ["skipped"]
    local = COMM.Split(COMM.rank % 2, COMM.rank)
    inter = local.Create_intercomm(0, COMM, 1 - COMM.rank % 2, tag=77)
    try:
        pydra.Executor(inter)
        mine = "accepted"
    except ValueError as exc:
        mine = str(exc)
    finally:
        inter.Free()
        local.Free()
    return COMM.gather(mine, root=0)


def map_timeout(ex):
    started = time.monotonic()
    results = ex.map(time.sleep, [1.0], timeout=0.2)
    try:
        next(results)
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        outcome = type(exc).__name__
    else:
        outcome = "no exception"
    return {"raised": outcome, "seconds": round(time.monotonic() - started, 2), "after": list(ex.map(w.inc, range(5)))}


def submit_exception(ex):
    future = ex.submit(fails_on_13, 13)
    try:
        future.result(timeout=30)
    except Exception as exc:  # noqa: BLE001
        text = "".join(traceback.format_exception(exc))
        return {"error": describe(exc), "after": ex.submit(w.square, 12).result(timeout=30),
                "user_frames": text.count(", in fails_on_13\n"), "pydra_core_frames": text.count("pydra/_core/")}
    return {"error": None}


def map_exception(ex):
    seen = []
    try:
        for value in ex.map(fails_on_13_slow_12, range(30)):
            seen.append(value)
    except Exception as exc:  # noqa: BLE001
        return {"seen": seen, "error": describe(exc), "after": list(ex.map(w.square, range(5)))}
    return {"seen": seen, "error": None}


class Counted:
    """An endless generator that counts how many items were pulled from it."""

    def __init__(self) -> None:
        self.pulled = 0

    def __iter__(self):
        for i in itertools.count():
            self.pulled = i + 1
            yield i


def endless(ex, chunksize):
    source = Counted()
    taken = []
    for value in ex.map(w.square, source, chunksize=chunksize):
        taken.append(value)
        if len(taken) == 1000:
            break
    pulled_at_break = source.pulled
    after = {
        "map": list(ex.map(w.inc, range(100), chunksize=chunksize)),
        "submit": ex.submit(w.double, 21).result(timeout=30),
        "task": ex.submit_task(pydra.Parallel(w.square), *range(10)).result(timeout=30),
    }
    return {"taken_ok": taken == [i * i for i in range(1000)], "pulled": pulled_at_break, "after": after}


def slow_consumer(ex):
    """Take 10 results, then hold the iterator without reading for a while: how far did the input run ahead?"""
    source = Counted()
    results = ex.map(w.square, source, chunksize=None)
    first = [next(results) for _ in range(10)]
    time.sleep(1.0)
    pulled = source.pulled
    results.close()
    return {"first": first, "pulled": pulled}


def unpicklable_map(ex):
    try:
        value = list(ex.map(lambda x: x + 1, [1, 2], timeout=3))
    except Exception as exc:  # noqa: BLE001
        return {"raised": type(exc).__name__, "message": str(exc)[:200], "after": ex.submit(abs, -3).result(timeout=30)}
    return {"raised": None, "value": value}


UNPICKLABLE = lambda x: x  # noqa: E731  (a lambda pickles by name, and has none)


def unpicklable_argument(ex):
    """Two calls (with one worker, usually in one message): only the one whose argument cannot be pickled fails."""
    bad, good = ex.submit(abs, UNPICKLABLE), ex.submit(abs, -5)
    error = bad.exception(timeout=30)
    return {"raised": type(error).__name__ if error else None, "notes": getattr(error, "__notes__", []),
            "chained": error is not None and error.__context__ is not None, "good": good.result(timeout=30)}


def enter_twice(ex):
    """A second `with` on the same executor is refused, and the first session goes on."""
    try:
        ex.__enter__()
    except RuntimeError as exc:
        return {"raised": str(exc), "after": ex.submit(abs, -4).result(timeout=30)}
    return {"raised": None}


def submit_task(ex):
    parallel = ex.submit_task(pydra.Parallel(w.square), *w.ITEMS)
    sequence = ex.submit_task(pydra.Sequence(w.numbers, w.total), 10)
    return {"parallel": parallel.result(timeout=30), "sequence": sequence.result(timeout=30)}


def shutdown(ex):
    first = ex.submit(w.square, 4)
    ex.shutdown(wait=True)
    try:
        ex.submit(w.square, 5)
    except RuntimeError as exc:
        refused = str(exc)
    else:
        refused = None
    return {"first": first.result(timeout=1), "done": first.done(), "refused": refused}


def spread(ex):
    """Two slow calls on two idle workers: do they run side by side on different ranks?"""

    futures = [ex.submit(sleep_then_rank, 0.5) for _ in range(2)]
    return sorted(f.result(timeout=30) for f in futures)


def sleep_then_rank(seconds):
    time.sleep(seconds)
    return MPI.COMM_WORLD.rank


class TwoArgumentError(Exception):
    """A common pattern that pickles but does not unpickle: __init__ needs two arguments."""

    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")
        self.code, self.detail = code, detail


def raise_two_argument_error(x):
    raise TwoArgumentError(x, "two-argument exception")


def _refuse_to_load():
    raise RuntimeError("this object cannot be unpickled")


class Unloadable:
    """Pickles fine, fails when unpickled (on rank 0)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def make_unloadable(_x):
    return Unloadable()


def make_generator(_x):
    return (i for i in range(3))


def outcome_of(future) -> dict:
    try:
        value = future.result(timeout=30)
    except Exception as exc:  # noqa: BLE001
        return {"raised": type(exc).__name__, "message": str(exc)[:300], "notes": " ".join(getattr(exc, "__notes__", [])),
                "cause": str(exc.__cause__)[:300] if exc.__cause__ is not None else ""}
    return {"raised": None, "value_type": type(value).__name__}


def unpicklable_exception(ex):
    """A task raising an exception that cannot be rebuilt on rank 0: the caller still gets an error."""
    return {"outcome": outcome_of(ex.submit(raise_two_argument_error, 7)), "after": ex.submit(w.square, 9).result(timeout=30)}


def unloadable_result(ex):
    return {"outcome": outcome_of(ex.submit(make_unloadable, 1)), "after": ex.submit(w.square, 8).result(timeout=30)}


def unpicklable_result(ex):
    return {"outcome": outcome_of(ex.submit(make_generator, 1)), "after": ex.submit(w.square, 7).result(timeout=30)}


class Watched:
    """An argument whose lifetime a case watches."""


def settled_call_lets_go(ex):
    """A settled future no longer holds its call's arguments (it is the call itself, but a plain future never did)."""
    argument = Watched()
    watch = weakref.ref(argument)
    future = ex.submit(type, argument)
    future.result(timeout=30)
    del argument
    gc.collect()
    return {"freed": watch() is None, "still_held": future.done()}


def submit_from_threads(ex):
    """Executors are thread-safe: four threads submit and map at once."""
    import threading

    results: dict = {}

    def client(k):
        futures = [ex.submit(w.add_mul, k, i) for i in range(50)]
        mapped = list(ex.map(w.add_mul, [k] * 50, range(50)))
        results[k] = [f.result(timeout=60) for f in futures] == mapped == [w.add_mul(k, i) for i in range(50)]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def lone_calls(ex):
    """Calls one at a time: the caller runs the scheduler itself while it waits (Master.drive)."""
    results = [ex.submit(pow, i, 2).result(timeout=60) for i in range(200)]
    return {"results": results == [i**2 for i in range(200)], "driven": ex.master.driven}


def ctrl_c_while_waiting(ex):
    """SIGINT, over and over, while the main thread waits for lone calls: each KeyboardInterrupt comes out of
    the call it interrupted, and the scheduler goes on unharmed (every call, interrupted or not, completes)."""
    import signal

    got = signalled_while_waiting(ex, signal.SIGINT, KeyboardInterrupt)
    del got["driven meanwhile"]  # (a Ctrl-C is held back during a drive: the main thread drives)
    return got


class Poked(Exception):
    """What the user's handler of SIGUSR1 raises (as a timeout's handler of SIGALRM may)."""


def user_handler_while_waiting(ex):
    """A handler of the user's that raises, on another signal than SIGINT: the main thread does not run the
    scheduler while it is set (the exception could land mid-pass), and every call completes."""
    import signal

    def poke(signum, frame):
        raise Poked()

    previous = signal.signal(signal.SIGUSR1, poke)
    try:
        return signalled_while_waiting(ex, signal.SIGUSR1, Poked)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def signalled_while_waiting(ex, signum, raised):
    """Signal *signum* every 3 ms for 3 s while the main thread makes lone calls, *raised* coming out of them.

    A handler may raise between any two bytecodes, so one can land outside the calls' own ``try``: at the
    loop's test or its jump back, once the call has returned. That is the test's own race, not Pydra's, and
    an outer ``try`` catches it and goes on (failing would take a second signal within those few bytecodes).
    """
    import os
    import threading

    stop = threading.Event()

    def send_signals():
        while not stop.wait(0.003):
            os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send_signals)
    futures, interrupted, driven = [], [0], ex.master.driven
    deadline = time.monotonic() + 3

    def call_until_deadline():
        while time.monotonic() < deadline or not interrupted[0]:
            try:
                futures.append(ex.submit(pow, len(futures), 2))
                futures[-1].result(timeout=60)
            except raised:
                interrupted[0] += 1

    sender.start()
    try:
        while True:
            try:
                call_until_deadline()
                break
            except raised:
                interrupted[0] += 1
    finally:
        # The handler may raise here too, before stop.set() has run: the sender would then go on signalling
        # after the case restored the default action, which ends the process (CI under load: exit -10).
        while not stop.is_set():
            try:
                stop.set()
            except raised:
                pass
        while sender.is_alive() or not stop.is_set():
            try:
                sender.join()
                time.sleep(0.05)  # a last signal still on its way
            except raised:
                pass
    driven = ex.master.driven - driven
    while True:
        try:
            settled = [f.result(timeout=60) for f in futures] == [i**2 for i in range(len(futures))]
            after = [ex.submit(pow, i, 3).result(timeout=60) for i in range(50)] == [i**3 for i in range(50)]
            return {"interrupted": interrupted[0] > 0, "settled": settled, "after": after, "driven meanwhile": driven}
        except raised:
            pass


CASES = {
    "submit_result": lambda: session(submit_result),
    "futures_api": lambda: session(futures_api),
    "workers_get_none": workers_get_none,
    "map_chunksize_1": lambda: session(lambda ex: list(ex.map(w.square, w.ITEMS))),
    "map_chunksize_none": lambda: session(lambda ex: list(ex.map(w.square, range(5000), chunksize=None))),
    "map_chunksize_7": lambda: session(lambda ex: list(ex.map(w.square, range(100), chunksize=7))),
    "map_multiple_iterables": lambda: session(lambda ex: list(ex.map(pow, range(30), [2] * 25))),
    "map_multiple_iterables_none": lambda: session(
        lambda ex: list(ex.map(w.add_mul, range(3000), range(3, 4000), chunksize=None))
    ),
    "map_generator": lambda: session(lambda ex: list(ex.map(w.inc, (x for x in range(300))))),
    "map_empty": lambda: session(lambda ex: list(ex.map(w.inc, []))),
    "map_timeout": lambda: session(map_timeout),
    "submit_exception": lambda: session(submit_exception),
    "map_exception": lambda: session(map_exception),
    "endless_chunksize_1": lambda: session(lambda ex: endless(ex, 1)),
    "endless_chunksize_none": lambda: session(lambda ex: endless(ex, None)),
    "slow_consumer": lambda: session(slow_consumer),
    "submit_task": lambda: session(submit_task),
    "shutdown": lambda: session(shutdown),
    "unpicklable_map": lambda: session(unpicklable_map),
    "unpicklable_argument": lambda: session(unpicklable_argument),
    "enter_twice": lambda: session(enter_twice),
    "intercomm_refused": intercomm_refused,
    "spread": lambda: session(spread),
    "submit_from_threads": lambda: session(submit_from_threads),
    "unpicklable_result": lambda: session(unpicklable_result),
    "unpicklable_exception": lambda: session(unpicklable_exception),
    "unloadable_result": lambda: session(unloadable_result),
    "settled_call_lets_go": lambda: session(settled_call_lets_go),
    "lone_calls": lambda: session(lone_calls),
    "ctrl_c_while_waiting": lambda: session(ctrl_c_while_waiting),
    "user_handler_while_waiting": lambda: session(user_handler_while_waiting),
}

if __name__ == "__main__":
    core_jobkit.main(CASES)
