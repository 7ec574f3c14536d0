"""Rank 0's scheduler: hands units to workers, collects replies, never busy-waits.

The :class:`Master` owns every MPI message rank 0 exchanges with workers and
runs in its own thread (``pydra-master``) around an asyncio loop, so user code
on rank 0 (an :class:`~pydra.Executor` caller, the tree walker in
:mod:`pydra._core.evaluate`) submits work without touching MPI.

Work reaches workers from *sources* (:mod:`pydra._core.sources`): chunked
streams of items, single calls, and gangs that wait until the ranks they
need are idle. Each worker may have ``PYDRA_PIPELINE`` units (more for tiny
ones) in flight, so it finds its next unit waiting when it finishes one.

A worker that stops sending heartbeats for ``PYDRA_HEARTBEAT_TIMEOUT``
seconds is declared lost: it gets no more work, whatever it still says is
ignored, and every unit it held fails with :class:`~pydra.errors.WorkerLost`
so its source can reschedule it on the survivors.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from mpi4py import MPI

from pydra._core import protocol
from pydra._core.protocol import Failure
from pydra._core.runner import UnitRunner
from pydra._core.sources import Callback, CallQueue, GangRequest, Source
from pydra.comm import mpi
from pydra.config import setting
from pydra.errors import WorkerLost

#: most units in flight to one worker, however tiny they are.
MAX_INFLIGHT = 64

#: log records rank 0 keeps for ``pydra shell``'s ``logs``
LOG_RECORDS = 10_000


@dataclass
class WorkerState:
    """What rank 0 knows about one worker."""

    rank: int
    host: str
    #: units sent and not yet answered
    units_inflight: int = 0
    #: the gang unit this worker runs, if any (it is reserved until that reply)
    gang_uid: int | None = None
    #: ids of the definitions this worker holds
    known: set = field(default_factory=set)
    #: held for a gang: no other work may land here
    reserved: bool = False
    units_done: int = 0
    failures: int = 0
    busy_seconds: float = 0.0
    #: False once declared lost: it gets no work and its messages are ignored
    alive: bool = True
    #: time.monotonic() of its last message (any message counts as a heartbeat)
    last_heard: float = field(default_factory=time.monotonic)
    #: told to finish its work and take no more (``drain``)
    draining: bool = False
    #: (CPU seconds, resident bytes, when) from its last heartbeat, and the CPU share since the one before
    usage: tuple = (0.0, 0, 0.0)
    cpu_percent: float | None = None
    #: the commands messages sent that it has not said it read, oldest first (see Master._resend_alone)
    unread: deque = field(default_factory=deque)
    #: the number of the oldest of them (the worker counts the messages it reads from 0)
    first_unread: int = 0


@dataclass
class PendingUnit:
    """A unit sent to one or more workers whose replies are awaited."""

    callback: Callback
    ranks: list
    replies_due: int


class Master:
    """Schedules units onto the worker ranks of *comm*; rank 0 only."""

    def __init__(self, comm: MPI.Intracomm, hosts: list[str], heartbeats: bool = False) -> None:
        self.comm = comm
        self.host = hosts[0]
        self.started = time.time()
        # Without heartbeats (an MPI without MPI_THREAD_MULTIPLE) a silent worker is only busy.
        self.heartbeat_timeout = setting("HEARTBEAT_TIMEOUT", 10.0) if heartbeats and comm.size > 1 else None
        self.heartbeat = setting("HEARTBEAT", 0.5)
        self._next_heartbeat_check = 0.0
        self._next_beat = 0.0
        if comm.size > 1:
            self.workers = [WorkerState(rank, hosts[rank]) for rank in range(1, comm.size)]
            self.local: UnitRunner | None = None
        else:
            # No workers: rank 0 runs units itself, through the very same commands.
            self.workers = [WorkerState(0, hosts[0])]
            self.local = UnitRunner(0, 1, hosts[0], self._local_group, self._local_progress, self._local_cancelled)
        self._by_rank = {worker.rank: worker for worker in self.workers}
        self.depth = max(1, setting("PIPELINE", 2))
        self.batch_seconds = setting("BATCH_SECONDS", 0.02)
        self.least_retries = 0  # a service's admin may raise it (config retries N)
        self.pipeline_seconds = setting("PIPELINE_SECONDS", 0.002)
        self.inflight_limit = self.depth
        self._unit_seconds: float | None = None  # running mean of worker time per unit
        self.outbox = mpi.Outbox(comm)
        self.calls = CallQueue()
        self.sources: list[Source] = [self.calls]
        self.gangs: deque[GangRequest] = deque()
        self.pending: dict[int, PendingUnit] = {}
        self.progress: dict[int, tuple] = {}
        self._uids = itertools.count(1)
        self._tids = itertools.count(1)
        self._tid_of: dict[int, int] = {}  # id(obj) -> tid
        self._definitions: dict[int, tuple[Any, bytes]] = {}  # tid -> (obj, its pickle)
        self._cancelled_local: set[int] = set()
        self._walks: set = set()  # futures of tree walks still running (submit_coroutine)
        self._stop_requested = False  # request_stop was called (caller side)
        self._stopping = False  # no new work: STOP goes out once the submitted work is done
        self._stop_sent = False
        self._broken: str | None = None  # why a gang failed: some members may never answer again
        self.loop = asyncio.new_event_loop()
        self._wakeup = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="pydra-master", daemon=True)
        #: recent log records of tasks and of the scheduler, newest last (see :meth:`note`)
        self.logs: deque[dict] = deque(maxlen=LOG_RECORDS)
        self._log_numbers = itertools.count(1)
        #: called with each new record before it is kept (a service tells which job it belongs to)
        self.log_hook: Callable[[dict], None] | None = None

    # -- lifecycle (any thread) --------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
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
            self.call_soon(self._begin_stop)

    def join(self) -> None:
        """Wait until the scheduler thread has stopped every worker and ended."""
        self._thread.join()

    def call_soon(self, function: Callable, *args: Any) -> None:
        """Run *function(\\*args)* in the scheduler thread (nothing, once it has ended: all work is done)."""
        try:
            self.loop.call_soon_threadsafe(self._wake_with, function, args)
        except RuntimeError:
            if not self.loop.is_closed():
                raise

    def submit_coroutine(self, coroutine: Any) -> Any:
        """Run *coroutine* in the scheduler thread; return a ``concurrent.futures.Future``.

        The master does not stop (:meth:`request_stop`) while it runs.
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        self._walks.add(future)
        future.add_done_callback(self._walk_done)
        return future

    def _walk_done(self, future: Any) -> None:
        self._walks.discard(future)
        if self._stopping:
            self.call_soon(self.wake)  # (any thread: the future may end in the caller's)

    # -- scheduler thread ---------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._pump())
        except BaseException:
            # The futures of rank 0's callers would never complete, and the workers would wait forever.
            mpi.abort(self.comm, f"pydra: internal error in rank 0's scheduler; aborting the MPI job\n{traceback.format_exc()}")
        finally:
            self.loop.close()

    def _wake_with(self, function: Callable, args: tuple) -> None:
        function(*args)
        self._wakeup.set()

    def wake(self) -> None:
        """Tell the pump there is new work (scheduler thread only)."""
        self._wakeup.set()

    async def _pump(self) -> None:
        backoff = mpi.Backoff()
        while True:
            progressed = self._receive()
            self._check_heartbeats()
            self._beat()
            progressed = self._dispatch() or progressed
            if self._stopping and not self._stop_sent and self._work_done():
                self._send_stop()
            self.outbox.collect()
            if self._stop_sent and not any(worker.units_inflight for worker in self.workers):
                self.outbox.flush()
                return
            if progressed:
                backoff.reset()
            elif any(worker.units_inflight for worker in self.workers):
                # Replies are due: poll again soon. time.sleep is precise to microseconds,
                # where an asyncio timer would round up to the selector's millisecond.
                backoff.sleep()
            else:
                # Nothing in flight: sleep until new work arrives, or the next heartbeat is
                # due (a timer, not asyncio.wait_for: that would cost a task per sleep).
                alarm = self.loop.call_later(self.heartbeat, self._wakeup.set)
                await self._wakeup.wait()
                alarm.cancel()
                self._wakeup.clear()
            await asyncio.sleep(0)  # let tree walkers and cross-thread calls run

    def _begin_stop(self) -> None:
        self._stopping = True
        for source in self.sources:
            source.finish_up()

    def _work_done(self) -> bool:
        """Whether everything submitted before the stop has been answered (or given up)."""
        if self.pending or self.gangs or self._walks:
            return False
        return all(source.finished for source in self.sources if source is not self.calls) and not self.calls.waiting

    def _send_stop(self) -> None:
        self._stop_sent = True
        if self._broken:
            # A failed gang left members blocked in a collective that will never
            # complete; MPI offers no way to free them, so end the whole job.
            _abort_after_grace(self, 2.0)
        # After a loss, MPI_Finalize would wait for the lost ranks forever: the workers
        # must end their processes instead (and so must rank 0, see Master.lost_ranks).
        exit_process = bool(self.lost_ranks)
        for worker in self.workers:
            stop = (protocol.STOP, next(self._uids), exit_process)
            if worker.alive:
                self._send(worker, [stop], gang=False)
            elif worker.rank != 0:  # it may be alive after all (stuck, or slow): tell it too
                self.outbox.post(mpi.dumps([stop]), worker.rank, mpi.TAG_COMMANDS)
                self.outbox.forget(worker.rank)

    @property
    def lost_ranks(self) -> list[int]:
        """The workers declared lost so far.

        If there are any once the master has stopped, rank 0 must end the job
        with :func:`pydra.comm.mpi.end_job_after_loss`: MPI_Finalize would wait
        for them forever, and one stuck in a collective never exits by itself.
        """
        return [worker.rank for worker in self.workers if not worker.alive]

    def alive_workers(self) -> int:
        """How many workers can still take work."""
        return sum(worker.alive and not worker.draining for worker in self.workers)

    def drain(self, rank: int) -> None:
        """Let worker *rank* finish its units and give it no more (scheduler thread)."""
        self._by_rank[rank].draining = True

    def restart(self, rank: int) -> None:
        """Have an isolated worker start a new child process for its next unit (scheduler thread)."""
        worker = self._by_rank[rank]
        if worker.alive and worker.rank != 0:
            self._send(worker, [(protocol.RESTART,)], gang=False)

    def _note_usage(self, worker: WorkerState, usage: tuple) -> None:
        cpu, rss, when = usage  # *when* is the worker's clock: heartbeats may arrive bunched
        previous_cpu, _, previous_time = worker.usage
        if previous_time and when > previous_time:
            worker.cpu_percent = 100.0 * (cpu - previous_cpu) / (when - previous_time)
        worker.usage = (cpu, rss, when)

    # -- definitions: objects shipped once per worker -------------------------------------------

    def define(self, obj: Any) -> int:
        """Register *obj* (pickled once now) and return its id; workers receive it when first needed."""
        tid = self._tid_of.get(id(obj))
        if tid is None or self._definitions[tid][0] is not obj:
            tid = next(self._tids)
            self._definitions[tid] = (obj, mpi.dumps(obj))  # keeping obj alive keeps id(obj) unique
            self._tid_of[id(obj)] = tid
        return tid

    def new_run_id(self) -> int:
        """A fresh id for state that workers keep per run (a MapReduce's buffered pairs)."""
        return next(self._tids)

    def load_target(self, spec: Any) -> None:
        """Have every worker load a task file (a job submitted to a running service)."""
        for worker in self.workers:
            if worker.alive and worker.rank != 0:
                self._send(worker, [(protocol.LOAD, spec)], gang=False)

    def forget_run(self, run: int, ranks: Iterable[int]) -> None:
        """Tell *ranks* to drop what they keep for *run* (scheduler thread only)."""
        for rank in ranks:
            worker = self._by_rank[rank]
            if worker.alive:
                self._send(worker, [(protocol.FORGET, run)], gang=False)

    # -- submitting work (scheduler thread) ----------------------------------------------------

    def add_source(self, source: Source) -> None:
        self.sources.append(source)
        if self._stopping:
            source.finish_up()
        self.wake()

    def add_gang(self, request: GangRequest) -> None:
        available = self.alive_workers()
        if request.count > available:
            raise ValueError(f"the gang needs {request.count} worker ranks; this job has {available}")
        self.gangs.append(request)
        self.wake()

    def cancel(self, uids: list[int]) -> None:
        """Drop the units *uids*: their replies will be ignored, their tasks see ``cancelled``."""
        by_rank: dict[int, list[int]] = {}
        for uid in uids:
            unit = self.pending.pop(uid, None)
            if unit is not None:
                for rank in unit.ranks:
                    by_rank.setdefault(rank, []).append(uid)
        for rank, dropped in by_rank.items():
            if self.local is not None:
                self._cancelled_local.update(dropped)
            else:
                self.outbox.post(mpi.dumps(dropped), rank, mpi.TAG_CANCEL)

    # -- dispatch --------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand every worker with room its share of the waiting work now (scheduler thread)."""
        self._dispatch()

    def _dispatch(self) -> bool:
        sent = self._start_gangs()
        limit = self.inflight_limit
        # Deal units one per worker per round, so idle workers are served before queues
        # grow; then send each worker its share as one message.
        shares: dict[int, list[tuple]] = {}
        room = {w.rank: limit - w.units_inflight for w in self.workers if w.alive and not w.reserved and not w.draining}
        ready = [w for w in self.workers if room.get(w.rank, 0) > 0]
        while ready:
            for worker in ready:
                unit = self._next_unit(worker.rank)
                if unit is None:
                    room[worker.rank] = 0  # nothing for this one (a retry may be waiting for another)
                    continue
                command, callback = unit
                self.pending[command[1]] = PendingUnit(callback, [worker.rank], 1)
                shares.setdefault(worker.rank, []).append(command)
                room[worker.rank] -= 1
            ready = [w for w in ready if room[w.rank] > 0]
        for rank, commands in shares.items():
            self._send(self._by_rank[rank], commands, gang=False)
        return sent or bool(shares)

    def _next_unit(self, rank: int) -> tuple[tuple, Callback] | None:
        for source in self.sources:
            unit = source.next_unit(next(self._uids), rank)
            if unit is not None:
                return unit
        if any(source.finished for source in self.sources):
            self.sources = [source for source in self.sources if not source.finished]
        return None

    def _start_gangs(self) -> bool:
        started = False
        while self.gangs:
            gang = self.gangs[0]
            lost = [rank for rank in gang.members or () if not self._by_rank[rank].alive]
            if lost or gang.count > self.alive_workers():
                self.gangs.popleft()
                gang.callback(None, WorkerLost(f"the gang needs ranks that were lost ({lost or self.lost_ranks})"))
                continue
            if gang.members is not None:
                team = [self._by_rank[rank] for rank in gang.members]
            else:
                for worker in self.workers:
                    free = worker.alive and not worker.draining and not worker.reserved and not worker.units_inflight
                    if free and len(gang.held) < gang.count and worker not in gang.held:
                        gang.held.append(worker)
                team = gang.held
            for worker in team:
                worker.reserved = True  # hold it: nothing else may start here meanwhile
            if len(team) < gang.count or any(worker.units_inflight for worker in team):
                return started
            self.gangs.popleft()
            members = sorted(worker.rank for worker in team)
            uid = next(self._uids)
            self.pending[uid] = PendingUnit(self._gang_callback(gang, members), members, len(members))
            command = gang.make_command(uid, members)
            for worker in team:
                self._send(worker, [command], gang=True)
            started = True
        return started

    def _gang_callback(self, gang: GangRequest, members: list) -> Callback:
        """Collects the members' replies; the gang's result is them all, in member order."""
        results: dict[int, Any] = {}
        failed = False

        def callback(ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
            nonlocal failed
            if failed:
                return
            if not ok:
                failed = True
                lost = isinstance(value.exception, WorkerLost)
                error = value.to_exception(f"in a gang on ranks {members}")
                if not lost:
                    # The other members may be blocked in a collective with the failed one.
                    self._broken = "".join(traceback.format_exception(error))
                gang.callback(None, error)
                if lost:
                    # Those still in the gang's collectives wait for the lost rank forever, and
                    # MPI cannot free them: they are lost too. (The gang runs again elsewhere.)
                    for member in members:
                        if member != rank and member not in results:
                            self.lose_worker(member, f"was in a collective with lost rank {rank}")
                return
            results[rank] = value
            if len(results) == len(members):
                gang.callback([results[rank] for rank in members], None)

        return callback

    def _send(self, worker: WorkerState, commands: list[tuple], gang: bool) -> None:
        for command in commands:
            if command[0] in (protocol.MAP, protocol.MR_MAP, protocol.GANG, protocol.MR_REDUCE):
                tid = command[2]
                if tid not in worker.known:
                    worker.known.add(tid)
                    commands = [(protocol.DEFINE, tid, self._definitions[tid][1])] + commands
        units = [command for command in commands if command[0] not in protocol.NO_REPLY]
        worker.units_inflight += len(units)
        if gang:
            worker.gang_uid = units[0][1]
        if self.local is not None:
            # One at a time, so a failure is handled (and later units cancelled) before they run.
            for command in commands:
                reply = self.local.execute(command)
                if reply is not None:
                    self._handle_replies(worker, [(*reply, None)])
            return
        try:
            payload = mpi.dumps(commands)
        except Exception as exc:
            self._refuse(worker, commands, exc)
            return
        self._post_commands(worker, commands, payload)

    def _post_commands(self, worker: WorkerState, commands: list[tuple], payload: bytes) -> None:
        worker.unread.append(commands)  # until the worker says it read them: it may send them back
        self.outbox.post(payload, worker.rank, mpi.TAG_COMMANDS)

    def _read_up_to(self, worker: WorkerState, read: int) -> None:
        """*worker* has read its first *read* commands messages: forget them."""
        unread = worker.unread
        while worker.first_unread < read and unread:
            unread.popleft()
            worker.first_unread += 1

    def _refuse(self, worker: WorkerState, commands: list[tuple], exc: Exception) -> None:
        """Some command of a batch could not be pickled: fail those units at once, as if the worker
        had, with the pickling error itself; send the rest as usual."""
        sendable, failed = [], []
        for command in commands:
            try:
                mpi.dumps(command)
                sendable.append(command)
            except Exception as error:  # what pickle or the object's __reduce__ raised
                error.add_note(f"(while sending work to rank {worker.rank})")
                failed.append((command, error))
        if sendable:
            self._post_commands(worker, sendable, mpi.dumps(sendable))
        replies = [(command[1], False, Failure.capture(error, 0, self.comm.size, "rank 0"), 0.0, None)
                   for command, error in failed if command[0] not in protocol.NO_REPLY]
        self._handle_replies(worker, replies)

    # -- replies ---------------------------------------------------------------------------------

    def _receive(self) -> bool:
        if self.local is not None:
            return False
        got = False
        while (message := mpi.try_receive(self.comm)) is not None:
            got = True
            worker = self._by_rank[message.source]
            if not worker.alive:
                continue  # declared lost: its units are rescheduled, its word no longer counts
            worker.last_heard = time.monotonic()
            if message.tag == mpi.TAG_REPLIES:
                read, packed = mpi.loads(message.payload)
                self._read_up_to(worker, read)
                self._handle_replies(worker, [self._unpack(worker, *reply) for reply in packed])
            elif message.tag == mpi.TAG_LOG:
                uid, created, level, name, text = mpi.loads(message.payload)
                self.note(text, rank=message.source, level=level, logger=name, uid=uid, created=created)
            elif message.tag == mpi.TAG_HEARTBEAT and message.payload:
                self._note_usage(worker, mpi.loads(message.payload))
            elif message.tag == mpi.TAG_PROGRESS:
                uid, done, total, text = mpi.loads(message.payload)
                self.progress[uid] = (message.source, done, total, text)
            elif message.tag == mpi.TAG_BOUNCED:
                number, failure = mpi.loads(message.payload)
                self._resend_alone(worker, number, failure)
        return got

    def _resend_alone(self, worker: WorkerState, number: int, failure_blob: bytes) -> None:
        """*worker* could not unpickle its commands message *number*: send each unit of it in a message of its own.

        Then only the unit whose data cannot be loaded there fails, with the
        worker's error (a class only rank 0 can import, say); the others run.
        Rank 0 kept the message's commands until the worker said it read it,
        since their data may not load on rank 0 either.
        """
        commands = worker.unread[number - worker.first_unread]
        self._read_up_to(worker, number + 1)
        units = [command for command in commands if command[0] not in protocol.NO_REPLY]
        others = [command for command in commands if command[0] in protocol.NO_REPLY]
        if len(units) > 1:
            if others:  # definitions first: the units need them (their blobs are pickled on their own)
                self._post_commands(worker, others, mpi.dumps(others))
            for command in units:
                self._post_commands(worker, [command], mpi.dumps([command]))
            return
        try:
            failure = mpi.loads(failure_blob)
        except Exception as exc:  # the worker's error does not load here either: say so
            error = RuntimeError(f"rank {worker.rank} could not unpickle a command: {exc!r}")
            failure = Failure.capture(error, 0, self.comm.size, "rank 0")
        if units:
            failure.exception.add_note(f"(while rank {worker.rank} unpickled the call and its arguments)")
            self._handle_replies(worker, [(units[0][1], False, failure, 0.0, None)])
        else:
            self.note(f"rank {worker.rank} could not unpickle {others}: {failure.exception!r}", level="WARNING")

    def _unpack(self, worker: WorkerState, uid: int, ok: bool, blob: bytes, seconds: float) -> tuple:
        """A reply with its value unpickled, or a failure saying why that is impossible here."""
        try:
            return (uid, ok, mpi.loads(blob), seconds, blob if ok else None)
        except Exception as exc:
            error = TypeError(f"a result from rank {worker.rank} cannot be unpickled on rank 0: {exc!r}")
            return (uid, False, Failure.capture(error, 0, self.comm.size, "rank 0"), seconds, None)

    def _handle_replies(self, worker: WorkerState, replies: list[tuple]) -> None:
        worker.units_inflight -= len(replies)
        if worker.gang_uid is not None and any(reply[0] == worker.gang_uid for reply in replies):
            worker.reserved, worker.gang_uid = False, None
        else:
            self._adapt_pipeline(sum(reply[3] for reply in replies) / len(replies))
        for uid, ok, value, seconds, blob in replies:
            worker.busy_seconds += seconds
            self.progress.pop(uid, None)
            unit = self.pending.get(uid)
            if unit is None:
                continue  # cancelled, or a STOP acknowledgement: neither done nor failed
            worker.units_done += 1
            if not ok:
                worker.failures += 1
            unit.replies_due -= 1
            if unit.replies_due == 0:
                del self.pending[uid]
            unit.callback(ok, value, seconds, worker.rank, blob)

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

    # -- lost workers ----------------------------------------------------------------------------

    def _beat(self) -> None:
        """Tell the workers rank 0 lives: one whose master falls silent ends itself."""
        if self.heartbeat_timeout is None or self.local is not None or self._stopping:
            return  # (after STOP, a worker may be in MPI_Finalize: send it nothing more)
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat
            for worker in self.workers:
                if worker.alive:
                    self.outbox.post(b"", worker.rank, mpi.TAG_HEARTBEAT)

    def _check_heartbeats(self) -> None:
        if self.heartbeat_timeout is None or self.local is not None:
            return
        now = time.monotonic()
        if now < self._next_heartbeat_check:
            return
        self._next_heartbeat_check = now + min(1.0, self.heartbeat_timeout / 10)
        for worker in self.workers:
            silence = now - worker.last_heard
            if worker.alive and silence > self.heartbeat_timeout:
                self.lose_worker(worker.rank, f"no heartbeat for {silence:.1f} s")

    def lose_worker(self, rank: int, reason: str) -> None:
        """Declare worker *rank* lost: no more work for it, its units fail with WorkerLost."""
        worker = self._by_rank[rank]
        if not worker.alive:
            return
        worker.alive, worker.reserved, worker.gang_uid, worker.units_inflight = False, False, None, 0
        worker.unread.clear()
        self.outbox.forget(rank)
        print(f"pydra: lost worker rank {rank} on {worker.host} ({reason}); rescheduling its work", file=sys.stderr)
        self.note(f"lost worker rank {rank} on {worker.host} ({reason})", level="WARNING")
        lost = WorkerLost(f"rank {rank} on {worker.host} was lost: {reason}")
        failure = Failure.capture(lost, rank, self.comm.size, worker.host)
        for uid in [uid for uid, unit in self.pending.items() if rank in unit.ranks]:
            unit = self.pending.pop(uid, None)  # a callback may have dropped it meanwhile
            if unit is not None:
                self.progress.pop(uid, None)
                unit.callback(False, failure, 0.0, rank, None)
        for gang in self.gangs:
            if worker in gang.held:
                gang.held.remove(worker)
        if not self.alive_workers():
            self._take_over()
        self.wake()

    def _take_over(self) -> None:
        """Every worker is lost: rank 0 runs the rest of the work itself, as a one-process job does."""
        print("pydra: no worker rank is left; rank 0 runs the remaining work itself", file=sys.stderr)
        itself = WorkerState(0, self.host)
        self.workers.append(itself)
        self._by_rank[0] = itself
        self.local = UnitRunner(0, 1, self.host, self._local_group, self._local_progress, self._local_cancelled)

    def _adapt_pipeline(self, seconds: float) -> None:
        """Keep about ``PYDRA_PIPELINE_SECONDS`` of work queued at each worker.

        *seconds* is the worker time of one unit. Long units need only
        ``PYDRA_PIPELINE`` units in flight; tiny ones need many, or the worker
        finishes before rank 0 can send the next.
        """
        mean = self._unit_seconds
        mean = seconds if mean is None else 0.8 * mean + 0.2 * seconds
        self._unit_seconds = mean
        self.inflight_limit = max(self.depth, min(MAX_INFLIGHT, int(self.pipeline_seconds / max(mean, 1e-6))))

    # -- rank 0 running units itself -------------------------------------------------------------

    def _local_group(self, members: list, tag: int) -> MPI.Intracomm:
        return MPI.COMM_SELF.Dup()

    def _local_progress(self, uid: int, done: int, total: int | None, message: str | None) -> None:
        self.progress[uid] = (0, done, total, message)

    def _local_cancelled(self, uid: int) -> bool:
        return uid in self._cancelled_local

    # -- observation -----------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """A snapshot of the workers and the queue, for status displays."""
        return {
            "uptime": time.time() - self.started,
            "workers": [
                {
                    "rank": w.rank,
                    "host": w.host,
                    "state": _state_of(w),
                    "units_inflight": w.units_inflight,
                    "units_done": w.units_done,
                    "failures": w.failures,
                    "busy_seconds": w.busy_seconds,
                    "heartbeat_age": time.monotonic() - w.last_heard if w.rank != 0 else 0.0,
                    "cpu_percent": w.cpu_percent,
                    "memory_bytes": w.usage[1] or None,
                }
                for w in list(self.workers)
            ],
            "pending_units": len(self.pending),
            "progress": [
                {"unit": uid, "rank": rank, "done": done, "total": total, "message": message}
                for uid, (rank, done, total, message) in list(self.progress.items())
            ],
            "waiting_gangs": len(self.gangs),
        }


def _state_of(worker: WorkerState) -> str:
    if not worker.alive:
        return "lost"
    if worker.draining:
        return "draining" if worker.units_inflight else "drained"
    if worker.units_inflight:
        return "busy"
    return "reserved" if worker.reserved else "idle"


def _abort_after_grace(master: Master, seconds: float) -> None:
    """Abort the MPI job if the workers have not all answered STOP within *seconds*."""

    def watchdog() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not any(worker.units_inflight for worker in master.workers):
                return
            time.sleep(0.05)
        mpi.abort(master.comm, f"{master._broken}pydra: a gang task failed and left ranks blocked in MPI; aborting the job\n")

    threading.Thread(target=watchdog, name="pydra-abort-watchdog", daemon=True).start()
