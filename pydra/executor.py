"""The public entry points: :class:`Executor` and :func:`run`.

Both are collective: every rank of the communicator calls them. Rank 0 gets
results; the other ranks serve as workers until rank 0 is done, then get None.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
import time
import weakref
from collections import deque
from concurrent.futures._base import PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from mpi4py import MPI

from pydra._core import protocol, session
from pydra._core.futures import LeanFuture
from pydra._core.jobs import JobHandle
from pydra._core.sources import Chunk, ChunkStream
from pydra.comm import failures, serial
from pydra.config import setting
from pydra.tasks.base import as_task

if TYPE_CHECKING:  # rank 0's half, which loads asyncio: session.start imports it there alone
    from pydra._core.evaluate import UnitLog
    from pydra._core.master import Master


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` over the ranks of an MPI job.

    Use it like mpi4py's ``MPICommExecutor``, on every rank::

        with pydra.Executor() as executor:
            if executor is not None:          # rank 0
                print(list(executor.map(math.sqrt, range(100))))

    On rank 0 the block gets the executor; the other ranks serve as workers
    inside ``__enter__`` until rank 0 shuts it down, then get None. Without
    ``with`` (``Executor().__enter__()`` on every rank), rank 0 shuts it down
    at interpreter exit, after the calls still pending, as ``concurrent.futures``
    does.
    """

    def __init__(self, comm: MPI.Intracomm | None = None) -> None:
        comm = comm if comm is not None else MPI.COMM_WORLD
        if comm.Is_inter():
            raise ValueError("expecting an intracommunicator")  # as mpi4py's MPICommExecutor says
        self.comm = comm
        self._master: Master | None = None
        self._entered = False
        self._shutdown = False
        self._joined = False
        self._exiting = False  # shut down by the interpreter's exit
        self._jobs: weakref.WeakSet[JobHandle] = weakref.WeakSet()  # submit_task's
        self._feeds: weakref.WeakSet[_OrderedFeed] = weakref.WeakSet()

    def __enter__(self) -> "Executor | None":  # type: ignore[override]
        if self._entered:
            raise RuntimeError("this executor has already been entered; make a new one")
        self._entered = True
        self._master = session.run_session(self.comm)
        if self._master is None:
            return None
        atexit.register(self._shutdown_at_exit)  # unregistered once shut down
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, SystemExit) and self.comm.size > 1:
            session.exiting_with(exc)  # ending now would leave the workers' next collective waiting
        if self._master is not None:
            # As concurrent.futures: the pending calls still run, unless the user pressed Ctrl-C.
            self.shutdown(wait=True, cancel_futures=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))
        return False

    @property
    def master(self) -> Master:
        """The scheduler on rank 0 (an error anywhere else, outside the ``with`` block, or after shutdown)."""
        if self._master is None:
            raise RuntimeError(
                f"no Pydra session on rank {self.comm.rank}: use `with pydra.Executor() as ex:` on every rank"
                " and submit from rank 0 only"
            )
        if self._shutdown:
            # concurrent.futures' words, which callers match on
            raise RuntimeError(f"cannot schedule new futures after {'interpreter ' if self._exiting else ''}shutdown")
        return self._master

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedule ``fn(*args, **kwargs)`` on a worker; return its future."""
        master = self.master
        call = _Call(fn, args, kwargs, master)
        master.submit_call(call)
        return call

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = 1,
    ) -> Iterator[Any]:
        """Like ``map(fn, *iterables)`` computed on the workers, results in order.

        Items are pulled lazily as workers have room, so an endless generator
        is fine as long as results are consumed (or the iterator is closed).
        *chunksize* items travel together; ``chunksize=None`` lets Pydra size
        batches itself (best for tiny tasks). *timeout* counts from this call.
        After :meth:`shutdown`, the map still runs to the end of its input.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be a positive integer or None, got {chunksize}")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        master = self.master
        deadline = None if timeout is None else time.monotonic() + timeout
        items = iterables[0] if len(iterables) == 1 else zip(*iterables)
        star = len(iterables) > 1
        feed = _OrderedFeed()
        self._feeds.add(feed)
        # Items computed ahead of the reader: enough to keep every worker's pipeline full.
        from pydra._core.scheduler import MAX_INFLIGHT  # rank 0's half, loaded there already; never on a worker

        workers = len(master.workers)
        window = max(setting("MAX_BATCH") * (2 * workers + 2), 2 * MAX_INFLIGHT * workers)

        def start() -> None:
            try:
                tid = master.define(fn)
            except Exception as exc:  # fn cannot be pickled: the caller hears it at the first next()
                exc.add_note(f"(while sending {fn!r} to the workers)")
                serial.note_what_would_send_it(exc)
                feed.fail(exc, 0)
                return
            make_command = lambda uid, chunk: (protocol.MAP, uid, tid, chunk, star)  # noqa: E731
            feed.stream = ChunkStream(master.scheduler, make_command, items, chunksize, feed, window=window)
            master.add_source(feed.stream)

        master.call_soon(start)
        return feed.results(master, deadline)

    def submit_task(self, task: Any, *inputs: Any, log: UnitLog | None = None) -> concurrent.futures.Future:
        """Run a task tree with *inputs* as the root's input; return the future of its result.

        With a *log* (a run's journal), finished units are recorded there and
        units it already holds are not run again.
        """
        from pydra._core.evaluate import Walk

        job = Walk.start(self.master, as_task(task), inputs, log)
        self._jobs.add(job)
        return job.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no new work; stop the workers once the work submitted so far is done.

        As ``concurrent.futures``: calls already submitted still run (and a
        map runs to the end of its input) unless *cancel_futures*, which
        cancels every call not yet started (a map's reader then meets
        ``CancelledError`` where its unstarted items begin). With *wait*,
        return once all of it is done and the workers are stopped; without,
        at once. It may be called again, say with *wait* after a first
        ``shutdown(wait=False)``.
        """
        master = self._master
        if master is None:
            return
        self._shutdown = True
        if cancel_futures:
            for job in list(self._jobs):
                job.cancel()  # a tree walk that has not finished, started or not: its units too
            master.call_soon(self._cancel_waiting)
        master.request_stop()
        if wait and not self._joined:
            master.join()
            self._joined = True
            atexit.unregister(self._shutdown_at_exit)
            if master.lost_ranks:
                # MPI_Finalize at exit would wait for the lost ranks forever: end the job instead.
                atexit.register(failures.end_job_after_loss, self.comm, 0, master.stuck_ranks)

    def _cancel_waiting(self) -> None:
        """Scheduler thread: cancel every call and map item that no worker has been given."""
        master = self._master
        # First the workers with room take their share, as the idle threads of a pool would.
        master.dispatch()
        master.calls.cancel_waiting()
        for feed in list(self._feeds):
            feed.cancel_waiting()

    def _shutdown_at_exit(self) -> None:
        """Interpreter exit with the executor not shut down: run what is pending, then stop the workers."""
        master = self._master
        self._shutdown = self._exiting = True
        master.stop()
        if master.lost_ranks:
            failures.end_job_after_loss(self.comm, 0, master.stuck_ranks)

    def statistics(self) -> dict[str, Any]:
        """A snapshot of the workers and the queue."""
        return self.master.statistics()


#: the states of a call not settled yet (``concurrent.futures``' own)
_UNSETTLED = (PENDING, RUNNING)


class _Call(LeanFuture):
    """One :meth:`Executor.submit` call: the future its caller gets, and its command for a worker.

    The call is its own future (a ``concurrent.futures.Future``, lean: see
    :mod:`pydra._core.futures`), so that a submitted call costs rank 0 few
    objects, to make and for the garbage collector to walk while the caller
    keeps its futures. It lets go of the function and its arguments once it
    is settled, as a plain future would not hold them.
    """

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, master: Master) -> None:
        super().__init__()
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._master = master

    def result(self, timeout: float | None = None) -> Any:
        """As ``concurrent.futures``; a caller waiting for a lone call runs the scheduler itself meanwhile."""
        return super().result(self._drive(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``concurrent.futures``; a caller waiting for a lone call runs the scheduler itself meanwhile."""
        return super().exception(self._drive(timeout))

    def _drive(self, timeout: float | None) -> float | None:
        """Run the scheduler while it has this call's reply to take (:meth:`Master.drive`); the timeout left."""
        if self._state not in _UNSETTLED:
            return timeout
        started = time.perf_counter()
        self._master.drive(self.done, timeout)
        return None if timeout is None else max(0.0, timeout - (time.perf_counter() - started))

    def command(self, uid: int) -> tuple | None:
        """The CALL command, or None if the future was cancelled meanwhile."""
        if not self.set_running_or_notify_cancel():
            self._fn = self._args = self._kwargs = None
            return None
        return (protocol.CALL, uid, self._fn, self._args, self._kwargs)

    def reply(self, ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
        fn, self._fn = self._fn, None
        self._args = self._kwargs = None
        if ok:
            self.set_result(value)
        elif value.raised_here:  # pickling the call or unpickling its result: its own note says which
            self.set_exception(value.to_exception())
        else:
            name = getattr(fn, "__qualname__", repr(fn))
            self.set_exception(value.to_exception(f"in {name} on rank {rank}"))

    def withdraw(self) -> bool:
        """``shutdown(cancel_futures=True)`` before any worker has the call: cancel it, if it still can be."""
        if not self.cancel():
            return False
        self.set_running_or_notify_cancel()  # tells wait() and as_completed() it is done
        self._fn = self._args = self._kwargs = None
        return True


class _OrderedFeed:
    """Hands the chunks of an :meth:`Executor.map` from the scheduler thread to the caller, in order.

    It is the stream's sink (:class:`~pydra._core.sources.Sink`); chunks are
    keyed by the position of their first item.
    """

    def __init__(self) -> None:
        self.stream: ChunkStream | None = None
        self._ready = threading.Condition()
        self._chunks: dict[int, list] = {}
        self._failure: BaseException | None = None
        self._finished = False
        self._failed_at = 0  # item where the stream failed: the reader gets every item before it
        self._awaited = 0  # the item the reader waits for: only its chunk's arrival wakes the reader

    def chunk(self, chunk: Chunk, values: list, rank: int) -> None:
        with self._ready:
            self._chunks[chunk.start] = values
            if chunk.start == self._awaited:
                self._ready.notify()

    def unit_failed(self, chunk: Chunk, error: BaseException) -> None:
        self.fail(error, chunk.start)  # map() allows no failures

    def fail(self, error: BaseException, start: int) -> None:
        with self._ready:
            if self._failure is None or start < self._failed_at:
                self._failure, self._failed_at = error, start
            self._ready.notify()

    def done(self) -> None:
        with self._ready:
            self._finished = True
            self._ready.notify()

    def cancel_waiting(self) -> None:
        """``shutdown(cancel_futures=True)``: items not yet started are cancelled (scheduler thread)."""
        if self.stream is not None:
            self.stream.cancel_waiting()

    def _take(self, position: int, deadline: float | None, into: deque) -> int:
        """Move the values from item *position* on that have arrived, at least one, to *into*; 0 at the end."""
        with self._ready:
            self._awaited = position
            while position not in self._chunks:
                if self._failure is not None and position >= self._failed_at:
                    raise self._failure
                if self._finished:
                    return 0
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("map() results did not arrive in time")
                self._ready.wait(remaining)
            start = position
            while position in self._chunks:  # take every consecutive chunk in one go
                values = self._chunks.pop(position)
                into.extend(values)
                position += len(values)
                # The scheduler thread may hold this list a moment longer (the reply it came in, in one
                # process the runner's list itself): emptied, it keeps no value alive that the reader dropped.
                # (A map's stream journals nothing, so nothing else reads it.)
                values.clear()
            self._awaited = position
            return position - start

    def results(self, master: Master, deadline: float | None) -> Iterator[Any]:
        position = 0
        values: deque = deque()  # popped as yielded: a value the reader dropped is freed
        try:
            while True:
                if not values:
                    taken = self._take(position, deadline, values)
                    if not taken:
                        return
                    position += taken
                    stream = self.stream
                    if stream is not None:
                        # Only this thread writes it; the scheduler thread reads it.
                        stream.consumed += taken
                        if stream.waiting_for_consumer:
                            master.call_soon(master.wake)
                yield values.popleft()
        finally:
            if self._failure is None and not self._finished and self.stream is not None:
                master.call_soon(self.stream.abandon)


def run(task: Any, *inputs: Any, comm: MPI.Intracomm | None = None) -> Any:
    """Collective: run a task tree over the ranks of *comm* (default: all).

    Returns the root's result on rank 0 and None on the other ranks. A task
    that raises makes this raise on rank 0, with the worker's traceback.
    """
    with Executor(comm) as executor:
        if executor is None:
            return None
        return executor.submit_task(task, *inputs).result()
