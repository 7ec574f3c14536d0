"""Rank 0's scheduler: hands units to workers, collects replies, never busy-waits.

The :class:`Master` owns every MPI message rank 0 exchanges with workers and
runs in its own thread (``pydra-master``) around an asyncio loop, so user code
on rank 0 (an :class:`~pydra.Executor` caller, the tree walker in
:mod:`pydra._core.evaluate`) submits work without touching MPI.

Work reaches workers from *sources*: a :class:`ChunkStream` cuts an iterable
of items into chunks (adaptively sized, pulled lazily so a huge generator is
never materialised), a :class:`CallQueue` holds single calls, and a
:class:`GangRequest` waits until the ranks it needs are idle and starts them
together. Each worker may have ``PYDRA_PIPELINE`` units (more for tiny ones) in flight, so it
finds its next unit waiting when it finishes one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import pickle
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
from pydra.comm import mpi
from pydra.config import setting

#: default largest adaptive chunk: per-message costs are already negligible at this size.
MAX_BATCH = 16384

#: most units in flight to one worker, however tiny they are.
MAX_INFLIGHT = 64

#: called with (ok, value, seconds, rank) when a unit's reply arrives.
Callback = Callable[[bool, Any, float, int], None]


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


@dataclass
class PendingUnit:
    """A unit sent to one or more workers whose replies are awaited."""

    callback: Callback
    ranks: list
    replies_due: int


class BatchSizer:
    """Chooses how many items go into the next chunk.

    With a fixed *chunksize* that is the answer. Otherwise chunks start at one
    item and, once replies say how long an item takes, hold about
    ``PYDRA_BATCH_SECONDS`` of worker time, but never so many that the last
    chunks of a sized input leave workers idle.
    """

    def __init__(self, chunksize: int | None, workers: int, total: int | None) -> None:
        self.fixed = chunksize
        self.workers = workers
        self.remaining = total
        self.target = setting("BATCH_SECONDS", 0.02)
        self.largest = setting("MAX_BATCH", MAX_BATCH)
        self.seconds_per_item: float | None = None

    def next_size(self) -> int:
        if self.fixed:
            return self.fixed
        if self.seconds_per_item is None:
            size = 1
        else:
            size = int(min(self.largest, max(1.0, self.target / max(self.seconds_per_item, 1e-9))))
            if self.remaining is not None:
                size = min(size, max(1, math.ceil(self.remaining / (2 * self.workers))))
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - size)
        return size

    def observe(self, items: int, seconds: float) -> None:
        per_item = seconds / items
        if self.seconds_per_item is None:
            self.seconds_per_item = per_item
        else:
            self.seconds_per_item = 0.7 * self.seconds_per_item + 0.3 * per_item


class Source:
    """Something that hands out units; the master asks it for one whenever a worker has room."""

    def next_unit(self, uid: int) -> tuple[tuple, Callback] | None:
        """A command with id *uid* and the callback for its reply, or None if nothing is ready."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        """True once this source will never hand out another unit."""
        raise NotImplementedError


class CallQueue(Source):
    """Single function calls (``Executor.submit``) waiting for a worker."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[Callable[[int], tuple | None], Callback]] = deque()

    def add(self, make_command: Callable[[int], tuple | None], callback: Callback) -> None:
        """Queue a call; *make_command(uid)* may return None to withdraw it (a cancelled future)."""
        self.waiting.append((make_command, callback))

    def next_unit(self, uid: int) -> tuple[tuple, Callback] | None:
        while self.waiting:
            make_command, callback = self.waiting.popleft()
            command = make_command(uid)
            if command is not None:
                return command, callback
        return None

    @property
    def finished(self) -> bool:
        return False  # lives as long as the master


class ChunkStream(Source):
    """Cuts an iterable of items into chunks, one unit each, and reports results in order.

    *on_chunk(index, value, rank)* sees every successful chunk (in completion
    order) and *on_done()* the end of a stream that did not fail.
    *on_failure(error, index)* hears of a failed chunk: the stream hands out
    nothing more and cancels the chunks after it, but the chunks before it
    still report, so a reader gets every result up to the failure (a chunk
    failing earlier than one already reported is reported too). At most
    *window* items are handed out ahead of ``consumed`` (for consumers that
    read results as they come).
    """

    def __init__(
        self,
        master: "Master",
        make_command: Callable[[int, list], tuple],
        items: Iterable[Any],
        chunksize: int | None,
        on_chunk: Callable[[int, Any, int], None],
        on_failure: Callable[[BaseException, int], None],
        on_done: Callable[[], None],
        window: int | None = None,
    ) -> None:
        self.master = master
        self.make_command = make_command
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        self.items = iter(items)
        self.sizer = BatchSizer(chunksize, max(1, len(master.workers)), total)
        self.on_chunk, self.on_failure, self.on_done = on_chunk, on_failure, on_done
        self.window = window
        self.handed_out = 0  # chunks
        self.items_handed_out = 0
        self.consumed = 0  # items, counted by the consumer
        self.outstanding: dict[int, int] = {}  # uid -> chunk index
        self.waiting_for_consumer = False
        self.exhausted = False
        self.failed_at: int | None = None  # index of the earliest failed chunk
        self.abandoned = False
        self.items_done = 0

    def next_unit(self, uid: int) -> tuple[tuple, Callback] | None:
        if self.finished:
            return None
        self.waiting_for_consumer = self.window is not None and self.items_handed_out - self.consumed >= self.window
        if self.waiting_for_consumer:
            return None
        try:
            chunk = list(itertools.islice(self.items, self.sizer.next_size()))
        except Exception as exc:
            exc.add_note("raised while rank 0 pulled the next items")
            self._fail(exc, self.handed_out)
            return None
        if not chunk:
            self.exhausted = True
            self._check_done()
            return None
        index = self.handed_out
        self.handed_out += 1
        self.items_handed_out += len(chunk)
        self.outstanding[uid] = index
        count = len(chunk)

        def callback(ok: bool, value: Any, seconds: float, rank: int) -> None:
            del self.outstanding[uid]
            if self.abandoned or (self.failed_at is not None and index > self.failed_at):
                return
            if not ok:
                self._fail(value.to_exception(f"in chunk {index} ({count} items) on rank {rank}"), index)
                return
            self.items_done += count
            self.sizer.observe(count, seconds)
            self.on_chunk(index, value, rank)
            self._check_done()

        return self.make_command(uid, chunk), callback

    @property
    def finished(self) -> bool:
        return self.abandoned or self.failed_at is not None or (self.exhausted and not self.outstanding)

    def _check_done(self) -> None:
        if self.exhausted and not self.outstanding and self.failed_at is None:
            self.on_done()

    def _fail(self, error: BaseException, index: int) -> None:
        if self.failed_at is not None and index > self.failed_at:
            return
        self.failed_at = index
        self.master.cancel([uid for uid, later in self.outstanding.items() if later > index])
        self.on_failure(error, index)

    def abandon(self) -> None:
        """Hand out nothing more and cancel the chunks still out (the results are not wanted)."""
        self.abandoned = True
        self.master.cancel(list(self.outstanding))


@dataclass
class GangRequest:
    """A command to start on several workers at once, when all of them are idle.

    Either *members* names the world ranks (a MapReduce shuffle among the
    ranks holding its pairs) or *count* idle workers are taken, whichever.
    """

    make_command: Callable[[int, list], tuple]
    callback: Callable[[list | None, BaseException | None], None]
    count: int
    members: list | None = None
    #: workers held for this gang while it waits for the rest
    held: list = field(default_factory=list)


class Master:
    """Schedules units onto the worker ranks of *comm*; rank 0 only."""

    def __init__(self, comm: MPI.Intracomm, hosts: list[str]) -> None:
        self.comm = comm
        self.started = time.time()
        if comm.size > 1:
            self.workers = [WorkerState(rank, hosts[rank]) for rank in range(1, comm.size)]
            self.local: UnitRunner | None = None
        else:
            # No workers: rank 0 runs units itself, through the very same commands.
            self.workers = [WorkerState(0, hosts[0])]
            self.local = UnitRunner(0, 1, hosts[0], self._local_group, self._local_progress, self._local_cancelled)
        self._by_rank = {worker.rank: worker for worker in self.workers}
        self.depth = max(1, setting("PIPELINE", 2))
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
        self._stopping = False
        self._broken: str | None = None  # why a gang failed: some members may never answer again
        self.loop = asyncio.new_event_loop()
        self._wakeup = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="pydra-master", daemon=True)

    # -- lifecycle (any thread) --------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread.start()

    def stop(self) -> None:
        """Send every worker STOP after its queued work and wait until all have answered."""
        self.call_soon(self._begin_stop)
        self._thread.join()

    def call_soon(self, function: Callable, *args: Any) -> None:
        """Run *function(\\*args)* in the scheduler thread."""
        self.loop.call_soon_threadsafe(self._wake_with, function, args)

    def submit_coroutine(self, coroutine: Any) -> Any:
        """Run *coroutine* in the scheduler thread; return a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    # -- scheduler thread ---------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._pump())
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
            progressed = self._dispatch() or progressed
            self.outbox.collect()
            if self._stopping and not any(worker.units_inflight for worker in self.workers):
                self.outbox.flush()
                return
            if progressed:
                backoff.reset()
            elif any(worker.units_inflight for worker in self.workers):
                # Replies are due: poll again soon. time.sleep is precise to microseconds,
                # where an asyncio timer would round up to the selector's millisecond.
                backoff.sleep()
            else:
                await self._wakeup.wait()  # nothing in flight: sleep until new work arrives
                self._wakeup.clear()
            await asyncio.sleep(0)  # let tree walkers and cross-thread calls run

    def _begin_stop(self) -> None:
        self._stopping = True
        if self._broken:
            # A failed gang left members blocked in a collective that will never
            # complete; MPI offers no way to free them, so end the whole job.
            _abort_after_grace(self, 2.0)
        for worker in self.workers:
            self._send(worker, [(protocol.STOP, next(self._uids))], gang=False)

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

    # -- submitting work (scheduler thread) ----------------------------------------------------

    def add_source(self, source: Source) -> None:
        self.sources.append(source)
        self.wake()

    def add_gang(self, request: GangRequest) -> None:
        available = len(self.workers)
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

    def _dispatch(self) -> bool:
        sent = self._start_gangs()
        limit = self.inflight_limit
        # Deal units one per worker per round, so idle workers are served before queues
        # grow; then send each worker its share as one message.
        shares: dict[int, list[tuple]] = {}
        room = {w.rank: limit - w.units_inflight for w in self.workers if not w.reserved}
        ready = [w for w in self.workers if room.get(w.rank, 0) > 0]
        while ready:
            for worker in ready:
                unit = self._next_unit()
                if unit is None:
                    ready = []
                    break
                command, callback = unit
                self.pending[command[1]] = PendingUnit(callback, [worker.rank], 1)
                shares.setdefault(worker.rank, []).append(command)
                room[worker.rank] -= 1
            ready = [w for w in ready if room[w.rank] > 0]
        for rank, commands in shares.items():
            self._send(self._by_rank[rank], commands, gang=False)
        return sent or bool(shares)

    def _next_unit(self) -> tuple[tuple, Callback] | None:
        for source in self.sources:
            unit = source.next_unit(next(self._uids))
            if unit is not None:
                return unit
        if any(source.finished for source in self.sources):
            self.sources = [source for source in self.sources if not source.finished]
        return None

    def _start_gangs(self) -> bool:
        started = False
        while self.gangs:
            gang = self.gangs[0]
            if gang.members is not None:
                team = [self._by_rank[rank] for rank in gang.members]
            else:
                for worker in self.workers:
                    if len(gang.held) < gang.count and worker not in gang.held and not worker.reserved and not worker.units_inflight:
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

        def callback(ok: bool, value: Any, seconds: float, rank: int) -> None:
            nonlocal failed
            if failed:
                return
            if not ok:
                failed = True
                error = value.to_exception(f"in a gang on ranks {members}")
                self._broken = "".join(traceback.format_exception(error))
                gang.callback(None, error)
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
        units = [command for command in commands if command[0] != protocol.DEFINE]
        worker.units_inflight += len(units)
        if gang:
            worker.gang_uid = units[0][1]
        if self.local is not None:
            # One at a time, so a failure is handled (and later units cancelled) before they run.
            for command in commands:
                reply = self.local.execute(command)
                if reply is not None:
                    self._handle_replies(worker, [reply])
            return
        try:
            payload = mpi.dumps(commands)
        except Exception as exc:
            self._refuse(worker, commands, exc)
            return
        self.outbox.post(payload, worker.rank, mpi.TAG_COMMANDS)

    def _refuse(self, worker: WorkerState, commands: list[tuple], exc: Exception) -> None:
        """A command could not be pickled: fail its unit at once, as if the worker had."""
        error = TypeError(f"cannot send work to rank {worker.rank}: {exc}")
        failure = Failure.capture(error, 0, self.comm.size, "rank 0")
        replies = [(command[1], False, failure, 0.0) for command in commands if command[0] != protocol.DEFINE]
        self._handle_replies(worker, replies)

    # -- replies ---------------------------------------------------------------------------------

    def _receive(self) -> bool:
        if self.local is not None:
            return False
        got = False
        while (message := mpi.try_receive(self.comm)) is not None:
            got = True
            if message.tag == mpi.TAG_REPLIES:
                worker = self._by_rank[message.source]
                replies = [self._unpack(worker, *reply) for reply in pickle.loads(message.payload)]
                self._handle_replies(worker, replies)
            elif message.tag == mpi.TAG_PROGRESS:
                uid, done, total, text = pickle.loads(message.payload)
                self.progress[uid] = (message.source, done, total, text)
        return got

    def _unpack(self, worker: WorkerState, uid: int, ok: bool, blob: bytes, seconds: float) -> tuple:
        """A reply with its value unpickled, or a failure saying why that is impossible here."""
        try:
            return (uid, ok, pickle.loads(blob), seconds)
        except Exception as exc:
            error = TypeError(f"a result from rank {worker.rank} cannot be unpickled on rank 0: {exc!r}")
            return (uid, False, Failure.capture(error, 0, self.comm.size, "rank 0"), seconds)

    def _handle_replies(self, worker: WorkerState, replies: list[tuple]) -> None:
        worker.units_inflight -= len(replies)
        if worker.gang_uid is not None and any(reply[0] == worker.gang_uid for reply in replies):
            worker.reserved, worker.gang_uid = False, None
        else:
            self._adapt_pipeline(sum(reply[3] for reply in replies) / len(replies))
        for uid, ok, value, seconds in replies:
            worker.busy_seconds += seconds
            worker.units_done += 1
            if not ok:
                worker.failures += 1
            self.progress.pop(uid, None)
            unit = self.pending.get(uid)
            if unit is None:
                continue  # cancelled, or a STOP acknowledgement
            unit.replies_due -= 1
            if unit.replies_due == 0:
                del self.pending[uid]
            unit.callback(ok, value, seconds, worker.rank)

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
                    "state": "busy" if w.units_inflight else ("reserved" if w.reserved else "idle"),
                    "units_done": w.units_done,
                    "failures": w.failures,
                    "busy_seconds": w.busy_seconds,
                }
                for w in self.workers
            ],
            "pending_units": len(self.pending),
            "progress": [
                {"unit": uid, "rank": rank, "done": done, "total": total, "message": message}
                for uid, (rank, done, total, message) in list(self.progress.items())
            ],
            "waiting_gangs": len(self.gangs),
        }


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
