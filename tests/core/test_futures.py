"""pydra._core.futures: the lean future behaves as a plain concurrent.futures.Future, across threads."""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time

import pytest

from pydra._core import futures
from pydra._core.futures import LeanFuture, SelfLockingCondition


@pytest.fixture(params=["fields known", "fallback"])
def make(request, monkeypatch):
    """Both ways of making a LeanFuture: its own fields, or Future.__init__'s then the condition swapped."""
    if request.param == "fallback":
        monkeypatch.setattr(futures, "FIELDS_KNOWN", False)
    return LeanFuture


def settle_later(items: list, delay: float = 0.05, error: BaseException | None = None) -> threading.Thread:
    def settle() -> None:
        time.sleep(delay)
        for future in items:
            assert future.set_running_or_notify_cancel()
            if error is None:
                future.set_result(id(future))
            else:
                future.set_exception(error)

    thread = threading.Thread(target=settle)
    thread.start()
    return thread


def test_this_python_sets_the_known_fields():
    # Else LeanFuture falls back to Future.__init__ (still correct, a little slower): worth knowing.
    assert futures.FIELDS_KNOWN
    assert set(vars(LeanFuture())) == set(vars(concurrent.futures.Future()))


def test_fewer_objects_than_a_plain_future():
    def tracked(future) -> int:
        seen, todo = set(), [future]
        while todo:
            obj = todo.pop()
            if id(obj) not in seen and gc.is_tracked(obj) and not isinstance(obj, type):
                seen.add(id(obj))
                todo.extend(gc.get_referents(obj))
        return len(seen)

    assert tracked(LeanFuture()) < tracked(concurrent.futures.Future()) / 2
    # A call kept pending costs the collector three objects: itself, its condition and its list of wait()
    # waiters; the condition's deque and the list of callbacks come with the first wait and callback.
    assert tracked(LeanFuture()) == 3


def test_callbacks_added_from_many_threads_at_once_all_run(make):
    for _ in range(20):
        future, seen = make(), []
        start = threading.Barrier(4)

        def add(number: int) -> None:
            start.wait()
            future.add_done_callback(lambda f, n=number: seen.append(n))

        threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        future.set_result(None)
        assert sorted(seen) == [0, 1, 2, 3]


def test_result_waits_for_another_thread(make):
    future = make()
    thread = settle_later([future])
    assert not future.done()
    assert future.result(timeout=10) == id(future)
    thread.join()


def test_result_times_out(make):
    with pytest.raises(concurrent.futures.TimeoutError):
        make().result(timeout=0.01)


def test_exception_travels(make):
    future = make()
    thread = settle_later([future], error=KeyError("k"))
    with pytest.raises(KeyError):
        future.result(timeout=10)
    assert isinstance(future.exception(), KeyError)
    thread.join()


def test_wait_and_as_completed(make):
    items = [make() for _ in range(20)]
    thread = settle_later(items)
    done, not_done = concurrent.futures.wait(items, timeout=10)
    assert len(done) == 20 and not not_done
    thread.join()
    more = [make() for _ in range(5)]
    thread = settle_later(more)
    assert {f.result() for f in concurrent.futures.as_completed(more, timeout=10)} == {id(f) for f in more}
    thread.join()


def test_first_completed_and_timeout(make):
    slow, fast = make(), make()
    thread = settle_later([fast])
    done, not_done = concurrent.futures.wait([slow, fast], timeout=10, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    thread.join()
    assert concurrent.futures.wait([slow], timeout=0.01).not_done == {slow}


def test_cancel_and_callbacks(make):
    seen = []
    future = make()
    future.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert future.cancel() and future.cancelled() and seen == [True]
    assert not future.set_running_or_notify_cancel()
    running = make()
    assert running.set_running_or_notify_cancel() and running.running() and not running.cancel()
    running.add_done_callback(lambda f: seen.append(f.result()))
    running.set_result(7)
    assert seen == [True, 7]


def test_condition_wait_notify():
    condition = SelfLockingCondition()
    ready = []

    def waiter() -> None:
        with condition:
            assert condition.wait_for(lambda: ready, timeout=10)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.02)
    with condition:
        ready.append(1)
        condition.notify_all()
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        condition.notify()  # not held
