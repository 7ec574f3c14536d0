"""Walking a task tree on rank 0: which parts run where.

A serial subtree (a Task, or a Sequence of serial tasks) is shipped whole to
one worker as a single unit. Rank 0 itself only walks the parallel structure:
a Sequence with parallel children runs its children one after another; a
Parallel over a serial task becomes one :class:`ChunkStream` whose chunks
spread over the workers; a Parallel over a parallel subtree walks that subtree
for several items at once; a MapReduce maps in chunks then shuffles among the
workers holding its pairs; a gang task waits for enough idle workers.

Every node has a *path* (``r``, ``r.1``, ``r.1[3]``...), the same in every
run of the same tree, under which a :class:`UnitLog` (the run's journal)
records finished units; a resumed run skips what its log already holds.

:meth:`Walk.start` is how a job begins: it returns the job's
:class:`~pydra._core.jobs.JobHandle`, which is all that ``Executor.submit_task``,
``pydra run`` and the service use of the walk.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, Callable, Iterable, Protocol

from pydra._core import protocol
from pydra._core.jobs import JobHandle
from pydra._core.master import Master
from pydra._core.sources import Chunk, ChunkStream, GangRequest, RetryPolicy
from pydra.comm import serial
from pydra.errors import ItemFailed, WorkerLost
from pydra.tasks import GangTask, MapReduce, Parallel, Sequence, Task
from pydra.tasks.mapreduce import in_key_order

#: how often a gang (or a MapReduce's reduce) starts again after losing a member.
GANG_LOSSES = 3


class UnitLog(Protocol):
    """Durable record of finished units, by node path (see :mod:`pydra.journal`)."""

    def done(self, node: str) -> dict[int, tuple[int, bytes]]:
        """The units of *node* already recorded: start -> (count, pickled list of values)."""

    def record(self, node: str, start: int, count: int, blob: bytes, rank: int, seconds: float) -> None:
        """Record that items start .. start+count-1 of *node* gave the pickled values *blob*."""


class Walk:
    """One evaluation of a task tree on *master*, journaled in *log* if given (start one with :meth:`start`).

    Its state belongs to the scheduler thread; the readers below may be
    called from any thread (see :mod:`pydra._core.jobs`).
    """

    def __init__(self, master: Master, log: UnitLog | None = None) -> None:
        self.master = master
        self.log = log
        self.streams: list[ChunkStream] = []  # every stream this walk started, for progress and cancel
        self.gang_units: dict[int, tuple[int, ...]] = {}  # gang units running: uid -> members
        self.units_done = 0  # units that succeeded (chunks, gang runs)
        self.units_failed = 0  # units that failed for good, gang runs that failed

    @classmethod
    def start(cls, master: Master, root: Task, inputs: tuple | list = (), log: UnitLog | None = None) -> JobHandle:
        """Evaluate *root* on a run's *inputs* on *master*'s loop, journaled in *log*; the job's handle (any thread).

        *inputs* are what ``pydra run`` and ``Executor.submit_task`` are given
        (``root.root_args`` makes the root's arguments of them).
        """
        walk = cls(master, log)
        future = master.submit_coroutine(walk._run(root, root.root_args(tuple(inputs))))
        return JobHandle(master, walk, future)

    async def _run(self, root: Task, args: tuple) -> Any:
        try:
            return await self.evaluate(root, args)
        except BaseException:
            # A failed or cancelled job wants none of its other units (a failing node abandons
            # only its own stream; the items of a Parallel over subtrees each have theirs).
            self.cancel()
            raise

    def policy(self, task: Task, allow_failures: int = 0) -> RetryPolicy:
        """What to do when *task* fails: its own settings, with at least the master's ``least_retries``."""
        return RetryPolicy.for_task(task, allow_failures, self.master.scheduler.least_retries)

    def progress(self) -> tuple[int, int | None]:
        """Items done so far, and the total if every input so far has a length (any thread)."""
        done, failed, total = self.item_counts()
        return done + failed, total

    def item_counts(self) -> tuple[int, int, int | None]:
        """Items done, items failed within their allowance, and the total as :meth:`progress` gives it (any thread)."""
        streams = list(self.streams)
        done = sum(stream.items_done for stream in streams)
        failed = sum(stream.items_failed for stream in streams)
        totals = [stream.total for stream in streams]
        return done, failed, (None if not totals or None in totals else sum(totals))  # type: ignore[arg-type]

    def running_units(self) -> dict[int, tuple[int, ...]]:
        """This walk's units that workers run now: uid -> ranks (any thread)."""
        units = dict(self.gang_units)
        for stream in list(self.streams):
            # An abandoned or failed stream's units are cancelled, though they stay in outstanding.
            if not (stream.abandoned or stream.failed_at is not None):
                units.update((uid, (chunk.rank,)) for uid, chunk in list(stream.outstanding.items()))
        return units

    def owns(self, uid: int) -> bool:
        """Whether unit *uid* is one of this walk's, running now (any thread)."""
        if uid in self.gang_units:
            return True
        return any(uid in stream.outstanding and not (stream.abandoned or stream.failed_at is not None)
                   for stream in list(self.streams))

    def cancel(self) -> None:
        """Stop handing out this walk's units and cancel those running (scheduler thread)."""
        for stream in self.streams:
            stream.abandon()

    async def evaluate(self, node: Task, args: tuple, path: str = "r") -> Any:
        """The result of *node* called with *args*, computed on the workers."""
        master = self.master
        if node.is_serial:
            (value,) = await self.run_chunks(path, master.define(node), [args], 1, self.policy(node), True)
            return value
        if isinstance(node, Sequence):
            value = await self.evaluate(node.children[0], args, f"{path}.0")
            for index, child in enumerate(node.children[1:], 1):
                value = await self.evaluate(child, (value,), f"{path}.{index}")
            return value
        if isinstance(node, Parallel):
            items = node.items_for(args)
            if node.task.is_serial:
                policy = self.policy(node.task, node.allow_failures)
                return await self.run_chunks(path, master.define(node.task), items, node.chunksize, policy)
            walk_item = lambda index, item: self.evaluate(node.task, (item,), f"{path}[{index}]")  # noqa: E731
            return await gather_in_order(walk_item, items, limit=4 * len(master.workers))
        if isinstance(node, MapReduce):
            return await self._once(path, lambda: self.map_reduce(node, node.items_for(args)))
        if isinstance(node, GangTask):
            return await self._once(path, lambda: self.run_gang_task(node, args))
        raise TypeError(f"cannot run {type(node).__name__}: not a serial Task and not a Pydra container")

    async def _once(self, path: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        """*compute()*, or its result from the log of an earlier run; a new result is logged."""
        recorded = self.log.done(path) if self.log else {}
        if 0 in recorded:
            return serial.loads(recorded[0][1])[0]
        value = await compute()
        if self.log:
            self.log.record(path, 0, 1, serial.dumps([value]), 0, 0.0)
        return value

    def run_chunks(
        self, path: str, tid: int, items: Iterable[Any], chunksize: int | None, policy: RetryPolicy, star: bool = False
    ) -> Awaitable[list]:
        """Apply definition *tid* to every item on the workers; the list of results in order."""
        recorded = self.log.done(path) if self.log else {}
        sink = OrderedResults(self, {start: serial.loads(blob) for start, (_, blob) in recorded.items()})
        record = None
        if self.log:
            log = self.log
            record = lambda start, count, blob, rank, seconds: log.record(path, start, count, blob, rank, seconds)  # noqa: E731
        make_command = lambda uid, chunk: (protocol.MAP, uid, tid, chunk, star)  # noqa: E731
        skip = {start: count for start, (count, _) in recorded.items()}
        sink.stream = ChunkStream(
            self.master.scheduler, make_command, items, chunksize, sink, policy=policy, skip=skip, record=record
        )
        sink.stream.items_done = sum(count for count in skip.values())  # done by an earlier run
        self.streams.append(sink.stream)
        self.master.add_source(sink.stream)
        return sink.future

    async def map_reduce(self, job: MapReduce, items: Iterable[Any]) -> dict:
        """Map *items* in chunks on the workers, then shuffle and reduce among the ranks holding pairs.

        If a rank holding pairs is lost, before or during the reduce, the
        items it mapped are mapped again on the survivors and the reduce runs
        again among the ranks that hold pairs now.
        """
        master = self.master
        tid = master.define(job)
        run = master.new_run_id()  # the same job may be running several times at once
        policy = self.policy(job, job.allow_failures)
        make_map = lambda uid, chunk: (protocol.MR_MAP, uid, tid, chunk, run)  # noqa: E731
        holders = MapHolders(self)
        try:
            await holders.run(make_map, items, policy)
            for _ in range(GANG_LOSSES + 1):
                lost = [chunk for rank in holders.lost() for chunk in holders.by_rank.pop(rank)]
                if lost:
                    await holders.run(make_map, [item for chunk in lost for item in chunk.items], policy)
                    continue
                if not holders.by_rank:
                    return {}
                members = sorted(holders.by_rank)
                make_reduce = lambda uid, ranks: (protocol.MR_REDUCE, uid, tid, ranks, run)  # noqa: E731
                try:
                    parts = await self.run_gang(make_reduce, len(members), members)
                except WorkerLost:
                    continue
                return _merged(parts)
            raise WorkerLost(f"the reduce lost a member {GANG_LOSSES + 1} times")
        finally:
            master.forget_run(run, holders.ranks_used)

    async def run_gang_task(self, task: GangTask, args: tuple) -> Any:
        """Run a gang task; if a member is lost, run it again on other ranks."""
        master = self.master
        tid = master.define(task)
        make_command = lambda uid, members: (protocol.GANG, uid, tid, members, args)  # noqa: E731
        for attempt in range(GANG_LOSSES + 1):
            try:
                (value, *_) = await self.run_gang(make_command, task.ranks or master.alive_workers())
                return value
            except WorkerLost:
                if attempt == GANG_LOSSES:
                    raise

    def run_gang(self, make_command: Callable, count: int, members: list | None = None) -> Awaitable[list]:
        """:func:`run_gang`, with the gang's unit counted and attributed to this walk while it runs."""
        started: list[int] = []

        def command(uid: int, ranks: list) -> tuple:
            self.gang_units[uid] = tuple(ranks)
            started.append(uid)
            return make_command(uid, ranks)

        def ended(future: asyncio.Future) -> None:
            for uid in started:
                self.gang_units.pop(uid, None)
            if started and not future.cancelled():
                if future.exception() is None:
                    self.units_done += 1
                else:
                    self.units_failed += 1

        future = run_gang(self.master, command, count, members)
        future.add_done_callback(ended)
        return future


def as_exception(error: BaseException) -> Exception:
    """*error* as an ``Exception`` a tree walk can raise: a task's ``sys.exit()`` fails the tree.

    (An asyncio task re-raises ``SystemExit`` into its event loop, which would
    end rank 0's scheduler; the Executor's futures keep it as it is.)
    """
    if isinstance(error, Exception):
        return error
    converted = RuntimeError(f"the task raised {type(error).__name__}({error})")
    converted.__cause__ = error.__cause__
    for note in getattr(error, "__notes__", ()):
        converted.add_note(note)
    return converted


def _merged(parts: list[dict]) -> dict:
    """The reduce members' results as one dict in key order (each part is sorted already: a merge of runs)."""
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return in_key_order(merged)


def run_gang(master: Master, make_command: Callable, count: int, members: list | None = None) -> Awaitable[list]:
    """Start a gang of *count* workers (or exactly *members*); the list of their replies."""
    future = master.loop.create_future()

    def finish(values: list | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(as_exception(error))
            else:
                future.set_result(values)

    master.add_gang(GangRequest(make_command, finish, count, members))
    return future


async def gather_in_order(walk: Callable[[int, Any], Awaitable[Any]], items: Iterable[Any], limit: int) -> list:
    """``[await walk(i, item) for i, item in enumerate(items)]``, up to *limit* at once, items pulled lazily."""
    results: dict[int, Any] = {}
    running: set[asyncio.Task] = set()
    index_of: dict[asyncio.Task, int] = {}
    iterator = enumerate(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < max(1, limit):
                try:
                    index, item = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                task = asyncio.ensure_future(walk(index, item))
                running.add(task)
                index_of[task] = index
            if not running:
                return [results[i] for i in range(len(results))]
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                results[index_of.pop(task)] = task.result()  # re-raises the first failure
    finally:
        for task in running:
            task.cancel()


# Sinks: how a stream's outcome becomes the awaited result (see sources.Sink).


class _StreamResult:
    """A sink that settles a future: the stream's result, or its first fatal error (counted in *walk*)."""

    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.future = walk.master.loop.create_future()
        self.stream: ChunkStream | None = None

    def chunk(self, chunk: Chunk, values: Any, rank: int) -> None:
        self.walk.units_done += 1

    def fail(self, error: BaseException, start: int) -> None:
        if self.stream is not None:
            self.stream.abandon()  # a tree node fails whole: the chunks before the failure are not wanted either
        if not self.future.done():
            self.walk.units_failed += 1
            self.future.set_exception(as_exception(error))

    def unit_failed(self, chunk: Chunk, error: BaseException) -> None:
        self.walk.units_failed += 1
        line = str(error).splitlines()[0] if str(error) else ""
        print(f"pydra: {chunk.describe()} failed for good, allowed: {type(error).__name__}: {line}", file=sys.stderr)


class OrderedResults(_StreamResult):
    """Collects values by item position; *parts* holds those known already (a resumed run)."""

    def __init__(self, walk: Walk, parts: dict[int, list]) -> None:
        super().__init__(walk)
        self.parts = parts

    def chunk(self, chunk: Chunk, values: list, rank: int) -> None:
        super().chunk(chunk, values, rank)
        self.parts[chunk.start] = values

    def unit_failed(self, chunk: Chunk, error: BaseException) -> None:
        super().unit_failed(chunk, error)
        text = f"{type(error).__name__}: {error}"
        self.parts[chunk.start] = [ItemFailed(chunk.start + offset, text) for offset in range(len(chunk.items))]

    def done(self) -> None:
        if not self.future.done():
            ordered: list = []
            for start in sorted(self.parts):
                ordered.extend(self.parts.pop(start))
            self.future.set_result(ordered)


class MapHolders:
    """Which ranks hold the pairs of which map chunks, across the map streams of one MapReduce."""

    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.master = walk.master
        self.streams = walk.streams  # the walk's: its progress, cancel and attribution see them
        self.by_rank: dict[int, list[Chunk]] = {}
        self.ranks_used: set[int] = set()

    async def run(self, make_command: Callable, items: Iterable[Any], policy: RetryPolicy) -> None:
        """Map *items*; return once all are held (or failed within the policy's allowance)."""
        sink = _MapSink(self)
        sink.stream = ChunkStream(self.master.scheduler, make_command, items, None, sink, policy=policy)
        self.streams.append(sink.stream)
        self.master.add_source(sink.stream)
        await sink.future

    def lost(self) -> list[int]:
        return [rank for rank in self.by_rank if rank in self.master.lost_ranks]


class _MapSink(_StreamResult):
    def __init__(self, holders: MapHolders) -> None:
        super().__init__(holders.walk)
        self.holders = holders

    def chunk(self, chunk: Chunk, keys: int, rank: int) -> None:
        super().chunk(chunk, keys, rank)
        self.holders.by_rank.setdefault(rank, []).append(chunk)
        self.holders.ranks_used.add(rank)

    def done(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
