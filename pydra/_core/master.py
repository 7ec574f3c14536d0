"""Rank 0's scheduler thread: the I/O around :class:`~pydra._core.scheduler.Scheduler`.

The :class:`Master` runs in its own thread (``pydra-master``) around an
asyncio loop, so user code on rank 0 (an :class:`~pydra.Executor` caller,
the tree walker in :mod:`pydra._core.evaluate`) hands it work with
:meth:`Master.call_soon`. A caller waiting for a call of
``Executor.submit`` may run the scheduler itself meanwhile, while the
thread sleeps (:meth:`Master.drive`): one thread at a time does, holding
``_running``. Its pump turns what arrives
(messages, the passing of time) into the scheduler's events and carries out
the instructions the scheduler returns, through a transport: MPI messages to
the worker ranks (:class:`~pydra._core.transport.MpiTransport`), and, in a
one-process job or after every worker was lost, rank 0 running the units
itself in a thread of its own (:class:`~pydra._core.transport.LocalTransport`). It never
busy-waits: it polls eagerly while replies are due and sleeps otherwise.
"""

from __future__ import annotations

import _signal
import asyncio
import itertools
import selectors
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Iterable

from mpi4py import MPI

from pydra._core import events as ev
from pydra._core.events import Dispatch, StopRequested, Tick
from pydra._core.scheduler import Scheduler, Settings
from pydra._core.sources import Call, GangRequest, Source
from pydra._core.transport import LocalTransport, MpiTransport, Transport
from pydra.comm import failures, serial
from pydra.comm.backoff import Backoff
from pydra import startup
from pydra.config import setting
from pydra.launcher.supervise import DeathNotices

#: pump passes in a row that may skip the asyncio loop's own pass while messages keep coming
BUSY_PASSES = 16

#: log records rank 0 keeps for ``pydra shell``'s ``logs``
LOG_RECORDS = 10_000


class Master:
    """Schedules units onto the worker ranks of *comm*; rank 0 only."""

    def __init__(self, comm: MPI.Intracomm, hosts: list[str], heartbeats: bool = False) -> None:
        self.comm = comm
        self.host = hosts[0]
        self.started = time.time()
        settings = Settings(
            depth=max(1, setting("PIPELINE")),
            pipeline_seconds=setting("PIPELINE_SECONDS"),
            batch_seconds=setting("BATCH_SECONDS"),
            heartbeat=setting("HEARTBEAT"),
            # Without heartbeats (an MPI without MPI_THREAD_MULTIPLE) a silent worker is only busy.
            heartbeat_timeout=setting("HEARTBEAT_TIMEOUT") if heartbeats and comm.size > 1 else None,
            collectives_raise=failures.ulfm(comm),
        )
        ranks = list(range(1, comm.size)) if comm.size > 1 else [0]  # no workers: rank 0 runs units itself
        now = time.monotonic()
        self.scheduler = Scheduler(ranks, dict(enumerate(hosts)), settings, serial.dumps, comm.size, now)
        # The worker ranks over MPI; rank 0 itself, in one process or once every worker is lost.
        self.remote: MpiTransport | None = MpiTransport(comm) if comm.size > 1 else None
        self.local: LocalTransport | None = None if comm.size > 1 else LocalTransport(self)
        # Held by whichever thread runs the scheduler: the pump thread, except while it sleeps (in its
        # selector or between polls), when a caller waiting for a lone call may run it (see drive).
        self._running = threading.Lock()
        self.loop = asyncio.SelectorEventLoop(_ParkingSelector(self._running))
        self._wakeup = asyncio.Event()
        # What other threads ask of the scheduler thread (see call_soon), run at the top of each
        # pump iteration; the loop is woken only when the pump sleeps with nothing in flight.
        self._inbox: deque[tuple[Callable, tuple]] = deque()
        # Executor.submit's calls, queued before the inbox runs (see submit_call).
        self._calls: deque = deque()
        self._asleep = False
        self._spin = setting("SPIN_SECONDS")
        #: calls whose caller ran the scheduler itself until they were done (see drive)
        self.driven = 0
        self._ctrl_c = _CtrlC()
        self._thread = threading.Thread(target=self._main, name="pydra-master", daemon=True)
        self._stop_requested = False
        #: recent log records of tasks and of the scheduler, newest last (see :meth:`note`)
        self.logs: deque[dict] = deque(maxlen=LOG_RECORDS)
        self._log_numbers = itertools.count(1)
        #: called with each new record before it is kept (a service tells which job it belongs to)
        self.log_hook: Callable[[dict], None] | None = None
        #: called once every worker is lost when the scheduler may not take the work over (a service)
        self.no_worker_hook: Callable[[], None] | None = None

    # -- lifecycle (any thread) --------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._ctrl_c.install()
        self._thread.start()

    def stop(self) -> None:
        """Finish the work submitted so far, then stop every worker; wait for all that (any thread)."""
        self.request_stop()
        self.join()

    def request_stop(self) -> None:
        """Take no new work; once what was submitted is done, send every worker STOP (any thread, returns at once).

        Calls still queued run, streams run to the end of their input, tree
        walks started before finish; then the workers are stopped.
        """
        if not self._stop_requested:
            self._stop_requested = True
            self.call_soon(self.feed, StopRequested())

    def join(self) -> None:
        """Wait until the scheduler thread has stopped every worker and ended."""
        self._thread.join()
        self._ctrl_c.uninstall()
        startup.left()  # the session is over: how rank 0 ends from here on is its program's doing

    def call_soon(self, function: Callable, *args: Any) -> None:
        """Run *function(\\*args)* in the scheduler thread, in the order asked (any thread).

        Nothing runs once the scheduler thread has ended (all work is done then).
        A burst of calls costs a deque append each: the loop's self-pipe is
        written only to wake a pump asleep with nothing in flight, since each
        write also hands the GIL over (measured: submitting 20,000 calls took
        two to three times as long when every burst woke the loop).
        """
        self._inbox.append((function, args))
        self._wake_if_asleep()

    def submit_call(self, call: Call) -> None:
        """Queue *call* (``Executor.submit``'s) in the scheduler's ``CallQueue`` (any thread).

        The cheap form of ``call_soon(calls.add, call)``, for the hottest path
        of all: one deque append, no tuple or bound method for the garbage
        collector to walk while the calls wait. Calls are queued at the top of
        each pump pass, before the inbox runs, so a call submitted before
        something was asked of :meth:`call_soon` is queued before that runs.
        """
        self._calls.append(call)
        self._wake_if_asleep()

    def _wake_if_asleep(self) -> None:
        # No lock: the pump sets _asleep before it looks at its queues a last time, and this looks
        # at _asleep after appending, so one of the two sees the other (at worst, a spare wake-up).
        if self._asleep:
            self._wake()

    def _wake(self) -> None:
        # (_asleep first: set after the wake-up, it could undo the pump falling asleep again meanwhile. A
        # Ctrl-C in between only delays the pump to its next alarm, at most PYDRA_HEARTBEAT seconds.)
        self._asleep = False
        try:
            self.loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:
            if not self.loop.is_closed():
                raise

    def submit_coroutine(self, coroutine: Any) -> Any:
        """Run *coroutine* in the scheduler thread; return a ``concurrent.futures.Future``.

        The master does not stop (:meth:`request_stop`) while it runs.
        """
        self.call_soon(self._count_walks, 1)  # before the coroutine starts, and before a later stop
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        future.add_done_callback(lambda _: self.call_soon(self._count_walks, -1))
        return future

    def _count_walks(self, change: int) -> None:
        self.scheduler.walks += change

    # -- the scheduler thread -------------------------------------------------------------------

    def _main(self) -> None:
        self._running.acquire()
        asyncio.set_event_loop(self.loop)
        # A worker's supervisor on this host tells us at once when the worker dies (its heartbeats
        # would take PYDRA_HEARTBEAT_TIMEOUT to say so).
        notices = DeathNotices.open() if self.comm.size > 1 else None
        if notices is not None:
            self.loop.add_reader(notices.fileno(), self._take_notices, notices)
        try:
            self.loop.run_until_complete(self._pump())
        except BaseException:
            # The futures of rank 0's callers would never complete, and the workers would wait forever.
            failures.abort(self.comm, f"pydra: internal error in rank 0's scheduler; aborting the MPI job\n{traceback.format_exc()}")
        finally:
            if notices is not None:
                self.loop.remove_reader(notices.fileno())
                notices.close()
            self.loop.close()
            self._running.release()

    def _run_inbox(self, asked_too: bool = True) -> bool:
        """Queue the calls submitted and run what other threads asked for until now; whether there was anything.

        Without *asked_too*, only the calls (what a caller driving the
        scheduler may take: the rest may touch the loop, see drive).
        """
        inbox, calls = self._inbox, self._calls
        asked = len(inbox) if asked_too else 0  # not what arrives meanwhile: a steady stream must not hold the pump here
        # Counted after the inbox: a call submitted before something was asked is queued before it runs.
        submitted = len(calls)
        if submitted:
            add = self.scheduler.calls.add
            for _ in range(submitted):
                add(calls.popleft())
        for _ in range(asked):
            function, args = inbox.popleft()
            function(*args)
        return asked > 0 or submitted > 0

    def _fall_asleep(self) -> bool:
        """Whether the pump may sleep: nothing was asked meanwhile (from now on, call_soon wakes it)."""
        self._asleep = True
        if self._inbox or self._calls:
            self._asleep = False
        return self._asleep

    def _take_notices(self, notices: DeathNotices) -> None:
        for rank, how in notices.take():
            if 0 < rank < self.comm.size:
                self.lose_worker(rank, f"{how}, says its supervisor", dead=True)
        self._wakeup.set()

    def wake(self) -> None:
        """Tell the pump there is new work (scheduler thread only)."""
        self._wakeup.set()

    def feed(self, event: Any) -> bool:
        """Hand *event* to the scheduler and carry out what it says (scheduler thread); whether it sent work."""
        sent = False
        for instruction in self.scheduler.handle(event):
            kind = type(instruction)
            if kind is ev.Send:
                sent = True
                for refused in self._transport(instruction.rank).send(self, instruction.rank, instruction.commands):
                    self.feed(refused)
            elif kind is ev.SendCancel:
                self._transport(instruction.rank).cancel(instruction.rank, instruction.uids)
            elif kind is ev.Beat:
                self._transport(instruction.ranks[0]).beat(instruction.ranks)
            elif kind is ev.Lost:
                self._lost(instruction)
            elif kind is ev.NoWorkerLeft:
                if self.no_worker_hook is not None:
                    self.no_worker_hook()
            elif kind is ev.TakeOver:
                print("pydra: no worker rank is left; rank 0 runs the remaining work itself", file=sys.stderr)
                self.local = LocalTransport(self)
            elif kind is ev.AbortIfStuck:
                _abort_after_grace(self, instruction.reason, instruction.grace)
        return sent

    async def _pump(self) -> None:
        backoff = Backoff()
        scheduler = self.scheduler
        busy_passes = 0
        while True:
            progressed = self._pass()
            if scheduler.finished:
                for transport in self._transports():
                    transport.flush()
                return
            if progressed:
                backoff.reset()
            elif scheduler.inflight() and self.remote is not None:
                # Replies are due: poll again soon. time.sleep is precise to microseconds,
                # where an asyncio timer would round up to the selector's millisecond.
                self._running.release()  # a caller waiting for its call may poll meanwhile (drive)
                try:
                    backoff.sleep()
                finally:
                    self._running.acquire()
            elif self._fall_asleep():
                # Nothing in flight, or only on rank 0's own thread, which wakes us with each reply
                # (polling would take the GIL from its unit every few ms): sleep until new work
                # arrives, a timer is due or the next heartbeat (a timer, not asyncio.wait_for: that
                # would cost a task per sleep).
                deadline = scheduler.next_deadline()
                delay = scheduler.settings.heartbeat if deadline is None else min(scheduler.settings.heartbeat,
                                                                                   max(0.0, deadline - time.monotonic()))
                alarm = self.loop.call_later(delay, self._wakeup.set)
                await self._wakeup.wait()
                alarm.cancel()
                self._wakeup.clear()
                self._asleep = False
            # Let tree walkers run: at every pass that found nothing to do, and every
            # BUSY_PASSES passes while messages keep coming. (A loop pass is an epoll_wait,
            # which lets go of the GIL, and a thread submitting calls then keeps it for a
            # switch interval: once per pass, that was a fifth of the scheduler's time.)
            busy_passes = busy_passes + 1 if progressed else 0
            if busy_passes % BUSY_PASSES == 0:
                await asyncio.sleep(0)

    def _pass(self, asked_too: bool = True, done: Callable[[], bool] | None = None) -> bool:
        """One pass of the scheduler over what arrived and what waits; whether anything happened.

        A caller driving it (*done*: whether its call is settled) is let go
        as soon as the messages taken settle its call: dispatching is left to
        the next pass, or to the scheduler thread.
        """
        progressed = self._run_inbox(asked_too)
        now = time.monotonic()
        took = self._take_messages(now)
        self.feed(Tick(now))  # (always: a caller making call after call may be the only one passing by)
        if took and done is not None and done():
            return True
        progressed = self.feed(Dispatch(now)) or took or progressed
        for transport in self._transports():
            transport.collect()
        return progressed

    def drive(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Run the scheduler in the calling thread until *done()*, while replies keep coming (a caller waiting).

        A lone call's round trip otherwise crosses two thread hand-offs on
        rank 0 (the caller wakes the scheduler thread, which wakes the caller),
        tens of microseconds each. The caller takes over while the scheduler
        thread sleeps (waiting at most ``PYDRA_SPIN_SECONDS`` for it to finish
        a pass), and hands back once *done()*, once nothing has arrived for
        ``PYDRA_SPIN_SECONDS``, or at *timeout*. On the main thread, the
        ``KeyboardInterrupt`` of a Ctrl-C is raised once it has handed back,
        never in the middle of a scheduler pass (:class:`_CtrlC`).
        """
        if self.remote is None or threading.get_ident() == self._thread.ident or self._inbox:
            # Rank 0 runs the units itself; or this is the scheduler thread (a done callback); or other
            # threads asked for things, which may touch the loop (cancel a walk) and must run first.
            return
        ctrl_c = self._ctrl_c
        if not ctrl_c.may_drive():
            return
        end = None if timeout is None else time.perf_counter() + timeout
        ctrl_c.holding = True  # from here on: a KeyboardInterrupt between taking the lock and the try would keep it
        try:
            if self._running.acquire(timeout=self._spin if end is None else min(self._spin, timeout or 0.0)):
                try:
                    self._drive(done, end)
                except BaseException:
                    # As in the scheduler thread: the scheduler is in an unknown state, and every caller
                    # and worker would wait forever. (A Ctrl-C meanwhile is held back: this is not one.)
                    failures.abort(self.comm, "pydra: internal error in rank 0's scheduler, run by a caller waiting"
                                              f" for its call; aborting the MPI job\n{traceback.format_exc()}")
                finally:
                    self._running.release()
                    if self.scheduler.inflight() or self._calls or self._inbox or self.scheduler.calls:
                        self._wake()  # the scheduler thread may be asleep, with no alarm before its next heartbeat
        finally:
            ctrl_c.holding = False
        ctrl_c.deliver()

    def _drive(self, done: Callable[[], bool], end: float | None) -> None:
        # The caller's own call goes out first: what has arrived meanwhile is taken while the worker runs it.
        if self._run_inbox(asked_too=False):
            self.dispatch()
        quiet_since = time.perf_counter()
        remote = self.remote
        while not done() and not self.scheduler.finished:
            if self._pass(asked_too=False, done=done):
                quiet_since = time.perf_counter()
                continue
            give_up = quiet_since + self._spin if end is None else min(quiet_since + self._spin, end)
            # Between passes only probe (a pass costs tens of µs): the reply is taken the moment it lands.
            while not remote.pending() and not self._calls:  # type: ignore[union-attr]
                if time.perf_counter() > give_up:
                    return
        if done():
            self.driven += 1

    def _take_messages(self, now: float) -> bool:
        """Feed the scheduler what has arrived; whether anything had.

        (A method of its own so that no local outlives it: the last reply's
        values would stay alive while the pump sleeps.)
        """
        events = [event for transport in self._transports() for event in transport.receive(self, now)]
        for event in events:
            self.feed(event)
        return bool(events)

    def _transport(self, rank: int) -> Transport:
        return self.local if rank == 0 else self.remote  # type: ignore[return-value]

    def _transports(self) -> list[Transport]:
        return [transport for transport in (self.remote, self.local) if transport is not None]

    def _lost(self, lost: ev.Lost) -> None:
        self.remote.forget(lost.rank)  # type: ignore[union-attr]  (only worker ranks are lost)
        print(f"pydra: lost worker rank {lost.rank} on {lost.host} ({lost.reason}); rescheduling its work",
              file=sys.stderr)
        self.note(f"lost worker rank {lost.rank} on {lost.host} ({lost.reason})", level="WARNING")

    # -- what callers ask of the scheduler (scheduler thread) ---------------------------------------

    def dispatch(self) -> None:
        """Hand every worker with room its share of the waiting work now."""
        self.feed(Dispatch(time.monotonic()))

    def lose_worker(self, rank: int, reason: str, dead: bool = False) -> None:
        """Declare worker *rank* lost: its units are rescheduled (*dead*: its process is known to have ended)."""
        self.feed(ev.WorkerGone(rank, reason, dead))

    def define(self, obj: Any) -> int:
        """Register *obj* (pickled once now); its id (see :meth:`Scheduler.define`)."""
        return self.scheduler.define(obj)

    def new_run_id(self) -> int:
        return self.scheduler.new_run_id()

    def add_source(self, source: Source) -> None:
        self.scheduler.add_source(source)
        self.wake()

    def add_gang(self, request: GangRequest) -> None:
        self.scheduler.add_gang(request)
        self.wake()

    def cancel(self, uids: list[int]) -> None:
        """Drop the units *uids*: their replies will be ignored, their tasks see ``cancelled``."""
        self.scheduler.cancel(uids)

    def drain(self, rank: int) -> None:
        self.scheduler.drain(rank)

    def undrain(self, rank: int) -> None:
        self.scheduler.undrain(rank)

    def restart(self, rank: int) -> None:
        self.scheduler.restart(rank)

    def load_target(self, spec: Any) -> None:
        self.scheduler.load_target(spec)

    def forget_run(self, run: int, ranks: Iterable[int]) -> None:
        self.scheduler.forget_run(run, ranks)

    # -- what callers may read (any thread) -----------------------------------------------------

    @property
    def calls(self) -> Any:
        return self.scheduler.calls

    @property
    def workers(self) -> list:
        return self.scheduler.workers

    @property
    def pending(self) -> dict:
        return self.scheduler.pending

    @property
    def progress(self) -> dict:
        """Unit id -> (rank, done, total, message) of the units that reported progress."""
        return self.scheduler.progress

    @property
    def lost_ranks(self) -> list[int]:
        """The workers declared lost so far.

        If there are any once the master has stopped, rank 0 must end the job
        with :func:`pydra.comm.failures.end_job_after_loss`: MPI_Finalize would wait
        for them forever, and one stuck in a collective never exits by itself.
        """
        return self.scheduler.lost_ranks

    @property
    def stuck_ranks(self) -> list[int]:
        """The lost workers known to be blocked in a collective (only MPI_Abort ends them)."""
        return self.scheduler.stuck_ranks

    def alive_workers(self) -> int:
        """How many workers can still take work."""
        return self.scheduler.alive_workers()

    def note(self, text: str, rank: int = 0, level: str = "INFO", logger: str = "pydra", uid: int | None = None,
             created: float | None = None) -> None:
        """Keep a log record (any thread): a task's, from a worker, or one of rank 0's own events."""
        record = {
            "number": next(self._log_numbers), "time": created or time.time(), "rank": rank, "uid": uid,
            "job": None, "level": level, "logger": logger, "message": text,
        }
        if self.log_hook is not None:
            self.log_hook(record)
        self.logs.append(record)

    def statistics(self) -> dict[str, Any]:
        """A snapshot of the workers and the queue, for status displays."""
        snapshot = self.scheduler.statistics()
        now = time.monotonic()
        for worker in snapshot["workers"]:
            last_heard = worker.pop("last_heard")
            worker["heartbeat_age"] = now - last_heard if worker["rank"] != 0 else 0.0
        return {"uptime": time.time() - self.started, **snapshot}


class _ParkingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The scheduler loop's selector: lets go of *running* while it waits (see :meth:`Master.drive`)."""

    def __init__(self, running: threading.Lock) -> None:
        super().__init__()
        self._running_lock = running

    def select(self, timeout: float | None = None) -> list:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        self._running_lock.release()
        try:
            return super().select(timeout)
        finally:
            self._running_lock.acquire()


#: the signals a Python handler may be set for, besides SIGINT
_OTHER_SIGNALS = tuple(sorted(signal.valid_signals() - {signal.SIGINT, signal.SIGKILL, signal.SIGSTOP}))


class _CtrlC:
    """Ctrl-C on the main thread while it runs the scheduler (:meth:`Master.drive`): held back until it is done.

    Python runs a signal's handler between any two bytecodes of the main
    thread, and a ``KeyboardInterrupt`` raised in the middle of a scheduler
    pass would leave the scheduler half-changed for good. So while a session
    runs, SIGINT's default handler is replaced by :meth:`handle`, which does
    what it does (raise ``KeyboardInterrupt``) except during a drive, after
    which :meth:`deliver` raises it. (asyncio's runner swaps SIGINT's handler
    for the same reason.) The main thread drives only while this handler is
    installed and no other signal has a Python handler (one of the user's,
    a timeout's on SIGALRM say, could raise too); otherwise it waits for the
    scheduler thread, as other threads may always drive.
    """

    def __init__(self) -> None:
        self.holding = False
        self.arrived = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.holding:
            self.arrived = True
        else:
            signal.default_int_handler(signum, frame)

    def install(self) -> None:
        """Take over SIGINT's default handler (main thread; anything else is left alone)."""
        if threading.current_thread() is threading.main_thread() and (
                signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            signal.signal(signal.SIGINT, self.handle)

    def uninstall(self) -> None:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == self.handle:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def may_drive(self) -> bool:
        """Whether this thread may run the scheduler (see above)."""
        if threading.current_thread() is not threading.main_thread():
            return True
        # _signal's getsignal, not signal's: that one looks each handler up in an enum, through a
        # ValueError for a Python handler (1 µs each, in every lone call's round trip; 2.4 µs for all).
        if _signal.getsignal(signal.SIGINT) != self.handle:
            return False
        for signum in _OTHER_SIGNALS:
            if callable(_signal.getsignal(signum)):
                return False
        return True

    def deliver(self) -> None:
        """Raise the ``KeyboardInterrupt`` held back, if one arrived."""
        if self.arrived:
            self.arrived = False
            signal.default_int_handler(signal.SIGINT, None)


def _abort_after_grace(master: Master, reason: str, seconds: float) -> None:
    """Abort the MPI job if the workers have not all answered STOP within *seconds*."""

    def watchdog() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not master.scheduler.inflight():
                return
            time.sleep(0.05)
        failures.abort(master.comm, reason)

    threading.Thread(target=watchdog, name="pydra-abort-watchdog", daemon=True).start()
