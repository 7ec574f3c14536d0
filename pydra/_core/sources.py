"""Where the master's units come from: single calls, streams of items, gangs.

The :class:`~pydra._core.scheduler.Scheduler` asks its sources for a unit whenever
a worker has room. A :class:`CallQueue` holds single calls
(``Executor.submit``); a :class:`ChunkStream` cuts an iterable of items into
chunks, pulled lazily so a huge generator is never materialised, and owns
what happens when a chunk fails: retry it (after a growing delay, elsewhere
if another worker can take it), split it to find the bad item, record an
allowed failure, or fail the whole stream. A :class:`GangRequest` asks for
several workers at once.

Every unit has an id (*uid*) used once: a reply is taken only while its uid
is outstanding, so a unit that was rescheduled (its worker looked dead) and
then answers anyway is counted once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from pydra.config import SETTINGS, setting
from pydra.errors import WorkerLost

if TYPE_CHECKING:
    from pydra._core.scheduler import Scheduler
    from pydra._core.protocol import Failure

#: default largest adaptive chunk: per-message costs are already negligible at this size.
MAX_BATCH = SETTINGS["MAX_BATCH"].default

#: called with (ok, value, seconds, rank, blob) when a unit's reply arrives; *blob* is the
#: value as pickled by the worker (None when rank 0 ran the unit itself or it failed).
Callback = Callable[[bool, Any, float, int, "bytes | None"], None]

#: longest delay between two tries of a failing chunk, in seconds.
MAX_RETRY_DELAY = 30.0


class Source:
    """Something that hands out units; the scheduler asks it for one whenever a worker has room."""

    def next_unit(self, uid: int, rank: int) -> tuple[tuple, Callback] | None:
        """A command with id *uid* for worker *rank* and the callback for its reply, or None."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        """True once this source will never hand out another unit."""
        raise NotImplementedError

    def finish_up(self) -> None:
        """The scheduler is stopping: hand out the rest of the work without waiting for anyone."""


def is_lost(failure: "Failure") -> bool:
    """Whether a failed reply means the worker died, rather than the task raising."""
    return isinstance(failure.exception, WorkerLost)


class Call(Protocol):
    """One single call in a :class:`CallQueue` (``Executor.submit``'s ``_Call``)."""

    def command(self, uid: int) -> tuple | None:
        """Its command with id *uid*, or None to withdraw it (a cancelled future)."""

    def reply(self, ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
        """Its outcome (see :data:`Callback`)."""

    def withdraw(self) -> bool:
        """Withdraw it for :meth:`CallQueue.cancel_waiting`; whether it could be."""


class CallQueue(Source):
    """Single function calls (``Executor.submit``) waiting for a worker.

    A call whose worker is lost goes back in front of the queue, once:
    a call that loses a second worker fails with :class:`WorkerLost` (a
    ``BrokenExecutor``, as a process pool says), since it is likely what
    kills them, and must not go on to kill the rest (rank 0 included).
    """

    #: how often a call whose worker was lost runs again
    LOSSES = 1

    def __init__(self) -> None:
        self.waiting: deque[Call] = deque()
        #: calls to run again after a loss, served first: (call, its command, how often it may still be lost)
        self.again: deque[tuple[Call, tuple, int]] = deque()

    def add(self, call: Call) -> None:
        """Queue *call*."""
        self.waiting.append(call)

    def __len__(self) -> int:
        """How many calls wait for a worker."""
        return len(self.waiting) + len(self.again)

    def next_unit(self, uid: int, rank: int) -> tuple[tuple, Callback] | None:
        if self.again:
            call, command, losses_left = self.again.popleft()
            command = (command[0], uid, *command[2:])
            return command, partial(self._reply, call, command, losses_left)
        while self.waiting:
            call = self.waiting.popleft()
            command = call.command(uid)
            if command is not None:
                # (a partial, not a closure: one object per unit in flight, as the GC counts them)
                return command, partial(self._reply, call, command, self.LOSSES)
        return None

    def cancel_waiting(self) -> None:
        """Withdraw every call no worker has been given (``shutdown(cancel_futures=True)``).

        A call that lost its worker and waits to run again is not withdrawn:
        its caller has seen it start.
        """
        self.waiting = deque(call for call in self.waiting if not call.withdraw())

    def _reply(self, call: Call, command: tuple, losses_left: int,
               ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
        """*call*'s outcome, unless its worker was lost and it may run again: then it goes back in front."""
        if not ok and losses_left and is_lost(value):
            self.again.append((call, command, losses_left - 1))
            return
        call.reply(ok, value, seconds, rank, blob)

    @property
    def finished(self) -> bool:
        return False  # lives as long as the scheduler


class BatchSizer:
    """Chooses how many items go into the next chunk.

    With a fixed *chunksize* that is the answer. Otherwise chunks start at one
    item and, once replies say how long an item takes, hold about
    ``PYDRA_BATCH_SECONDS`` of worker time, but never so many that the last
    chunks of a sized input leave workers idle.
    """

    def __init__(self, chunksize: int | None, workers: int, total: int | None, target_seconds: float) -> None:
        self.fixed = chunksize
        self.workers = workers
        self.remaining = total
        self.target = target_seconds
        self.largest = setting("MAX_BATCH")
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


@dataclass(frozen=True)
class RetryPolicy:
    """What a stream does with a failed chunk.

    A chunk whose task raised is tried again up to *retries* times, waiting
    *delay* seconds before the first retry and twice as long before each
    next one. A chunk of several items is first split into single items
    (without using up a try), so one bad item does not sink its neighbours.
    After the last try the stream fails, unless fewer than *allow_failures*
    items have failed so far: then the item is recorded as failed and the
    stream carries on. A chunk whose worker died is rescheduled at once, up
    to *losses* times, without using up a try.
    """

    retries: int = 0
    delay: float = 0.1
    allow_failures: int = 0
    losses: int = 3

    @classmethod
    def for_task(cls, task: Any, allow_failures: int = 0, least_retries: int = 0) -> "RetryPolicy":
        """The policy of a Task's ``retries`` and ``retry_delay`` attributes (at least *least_retries*)."""
        retries = max(getattr(task, "retries", 0), least_retries)
        return cls(retries, getattr(task, "retry_delay", 0.1), allow_failures)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before try number *attempt* + 1 (*attempt* tries have failed)."""
        return min(MAX_RETRY_DELAY, self.delay * 2 ** (attempt - 1))


@dataclass
class Chunk:
    """Items ``start`` .. ``start + len(items) - 1`` of a stream, and how their tries went."""

    start: int
    items: list
    attempts: int = 0  # tries that raised
    losses: int = 0  # tries lost with their worker
    avoid: int | None = None  # the rank of the last failed try: retry elsewhere if possible
    rank: int | None = None  # the rank of the current try: a job handle tells which workers work for it

    def describe(self) -> str:
        if len(self.items) == 1:
            return f"item {self.start}"
        return f"items {self.start}..{self.start + len(self.items) - 1}"


class Sink(Protocol):
    """Where a :class:`ChunkStream` delivers its outcome (on the scheduler thread)."""

    def chunk(self, chunk: Chunk, values: Any, rank: int) -> None:
        """*chunk* succeeded on *rank* with *values* (in completion order, not input order)."""

    def unit_failed(self, chunk: Chunk, error: BaseException) -> None:
        """*chunk* failed for good, but within ``allow_failures``: the stream goes on."""

    def fail(self, error: BaseException, start: int) -> None:
        """The stream failed at item *start*; chunks before it still report."""

    def done(self) -> None:
        """Every item has been delivered (or recorded as failed)."""


#: records a chunk's result durably: (start, count, pickled values, rank, seconds).
Recorder = Callable[[int, int, bytes, int, float], None]


class ChunkStream(Source):
    """Cuts an iterable of items into chunks, one unit each, and reports them to a :class:`Sink`.

    After a fatal failure the stream hands out nothing more and cancels the
    chunks after it, but the chunks before it still report, so a reader gets
    every result up to the failure. At most *window* items are handed out
    ahead of ``consumed`` (for consumers that read results as they come).
    *skip* maps the start of item ranges already done (a resumed run's
    journal) to their length; those items are pulled and passed over.
    *record*, if given, hears of every successful chunk with its pickled
    values, to journal them.
    """

    def __init__(
        self,
        scheduler: "Scheduler",
        make_command: Callable[[int, list], tuple],
        items: Iterable[Any],
        chunksize: int | None,
        sink: Sink,
        *,
        window: int | None = None,
        policy: RetryPolicy = RetryPolicy(),
        skip: dict[int, int] | None = None,
        record: Recorder | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.make_command = make_command
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        self.total = total  # items, if the input has a length
        self.items = iter(items)
        self.sizer = BatchSizer(chunksize, max(1, scheduler.alive_workers()), total, scheduler.settings.batch_seconds)
        self.sink = sink
        self.window = window
        self.policy = policy
        self.skip = deque(sorted((skip or {}).items()))
        self.record = None if record is None else Coalescer(scheduler, record)
        self.position = 0  # items pulled from the iterable so far
        self.items_handed_out = 0
        self.consumed = 0  # items, counted by the consumer
        self.outstanding: dict[int, Chunk] = {}  # uid -> chunk
        self.retry: deque[Chunk] = deque()
        self.delayed = 0  # chunks sitting out a retry delay
        self.waiting_for_consumer = False
        self.exhausted = False
        self.failed_at: int | None = None  # start of the earliest fatally failed chunk
        self.abandoned = False
        self.items_done = 0
        self.items_failed = 0  # allowed failures so far

    def next_unit(self, uid: int, rank: int) -> tuple[tuple, Callback] | None:
        if self.finished:
            return None
        chunk = self._take_retry(rank) or self._pull()
        if chunk is None:
            return None
        chunk.rank = rank
        self.outstanding[uid] = chunk

        def callback(ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
            self._reply(self.outstanding.pop(uid), ok, value, seconds, rank, blob)

        return self.make_command(uid, chunk.items), callback

    @property
    def finished(self) -> bool:
        if self.abandoned or self.failed_at is not None:
            return True
        return self.exhausted and not (self.outstanding or self.retry or self.delayed)

    def abandon(self) -> None:
        """Hand out nothing more and cancel the chunks still out (the results are not wanted)."""
        self.abandoned = True
        self.scheduler.cancel(list(self.outstanding))

    def finish_up(self) -> None:
        # Every item of the input counts as submitted, as concurrent.futures' map submits them all.
        self.window = None

    def cancel_waiting(self) -> None:
        """Hand out nothing more; the chunks running finish and report, the rest fail with CancelledError.

        This is ``shutdown(cancel_futures=True)`` for a map: running calls
        complete, calls not started are cancelled.
        """
        if self.finished:
            return
        first = min([chunk.start for chunk in self.retry] + [self.position])
        self.exhausted = True
        self._fail(concurrent.futures.CancelledError(), first)

    # -- handing out ------------------------------------------------------------------------

    def _take_retry(self, rank: int) -> Chunk | None:
        for index, chunk in enumerate(self.retry):
            if chunk.avoid != rank or self.scheduler.alive_workers() <= 1:
                del self.retry[index]
                return chunk
        return None

    def _pull(self) -> Chunk | None:
        if self.exhausted:
            return None
        self.waiting_for_consumer = self.window is not None and self.items_handed_out - self.consumed >= self.window
        if self.waiting_for_consumer:
            return None
        try:
            self._pass_over_done()
            size = self.sizer.next_size()
            if self.skip:  # stop short of the next range that is already done
                size = min(size, self.skip[0][0] - self.position)
            items = list(itertools.islice(self.items, size))
        except Exception as exc:
            exc.add_note("raised while rank 0 pulled the next items")
            self._fail(exc, self.position)
            return None
        if not items:
            self.exhausted = True
            self._check_done()
            return None
        chunk = Chunk(self.position, items)
        self.position += len(items)
        self.items_handed_out += len(items)
        return chunk

    def _pass_over_done(self) -> None:
        while self.skip and self.skip[0][0] == self.position:
            _, count = self.skip.popleft()
            passed = sum(1 for _ in itertools.islice(self.items, count))
            if passed != count:
                raise ValueError(f"the input has fewer items than the journal recorded ({self.position + passed})")
            self.position += count

    # -- replies ----------------------------------------------------------------------------

    def _reply(self, chunk: Chunk, ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
        if self.abandoned or (self.failed_at is not None and chunk.start > self.failed_at):
            return
        if not ok:
            self._handle_failure(chunk, value, rank)
            return
        count = len(chunk.items)
        self.items_done += count
        self.sizer.observe(count, seconds)
        if self.record is not None:
            try:
                self.record.add(chunk.start, value, blob, rank, seconds)
            except Exception as exc:  # the journal cannot be written: nothing may go unrecorded
                self._fail(exc, chunk.start)
                return
        self.sink.chunk(chunk, value, rank)
        self._check_done()

    def _handle_failure(self, chunk: Chunk, failure: "Failure", rank: int) -> None:
        policy = self.policy
        chunk.avoid = rank
        if is_lost(failure):
            chunk.losses += 1
            if chunk.losses <= policy.losses:
                self._requeue(chunk)
                return
        else:
            chunk.attempts += 1
            if len(chunk.items) > 1 and (policy.retries or policy.allow_failures):
                # Find the bad item: each gets this try again, on its own.
                for offset, item in enumerate(chunk.items):
                    self._requeue(Chunk(chunk.start + offset, [item], chunk.attempts - 1, chunk.losses, rank))
                return
            if chunk.attempts <= policy.retries:
                self.delayed += 1
                self.scheduler.call_later(policy.delay_before(chunk.attempts), self._requeue_after_delay, chunk)
                return
        tries = f"after {chunk.attempts + chunk.losses} tries" if chunk.attempts + chunk.losses > 1 else "on its only try"
        error = failure.to_exception(f"in {chunk.describe()}, {tries}, last on rank {rank}")
        if self.items_failed + len(chunk.items) <= policy.allow_failures:
            self.items_failed += len(chunk.items)
            self.sink.unit_failed(chunk, error)
            self._check_done()
            return
        self._fail(error, chunk.start)

    def _requeue(self, chunk: Chunk) -> None:
        self.retry.append(chunk)  # the scheduler's next dispatch hands it out

    def _requeue_after_delay(self, chunk: Chunk) -> None:
        self.delayed -= 1
        if not (self.abandoned or self.failed_at is not None):
            self._requeue(chunk)

    def _check_done(self) -> None:
        if self.exhausted and not (self.outstanding or self.retry or self.delayed) and self.failed_at is None:
            if self.record is not None:
                try:
                    self.record.flush()
                except Exception as exc:
                    self._fail(exc, self.position)
                    return
            self.sink.done()

    def _fail(self, error: BaseException, start: int) -> None:
        if self.failed_at is not None and start > self.failed_at:
            return
        self.failed_at = start
        self.retry.clear()
        self.scheduler.cancel([uid for uid, later in self.outstanding.items() if later.start > start])
        self.sink.fail(error, start)


class Coalescer:
    """Joins the results of small consecutive chunks into fewer, larger journal records.

    Chunks of one item (``chunksize=1``) would each cost a journal row; here
    they wait up to ``COALESCE_SECONDS`` (or ``COALESCE_ITEMS`` items), then
    each run of consecutive chunks becomes one record. A chunk of
    ``COALESCE_ITEMS`` items or more is recorded at once, with the values as
    the worker pickled them.
    """

    COALESCE_SECONDS = 0.02
    COALESCE_ITEMS = 1024

    def __init__(self, scheduler: "Scheduler", record: Recorder) -> None:
        self.scheduler = scheduler
        self.record = record
        self.waiting: dict[int, tuple[list, int, float]] = {}  # start -> (values, rank, seconds)
        self.items_waiting = 0
        self.timer: Any = None

    def add(self, start: int, values: list, blob: bytes | None, rank: int, seconds: float) -> None:
        if len(values) >= self.COALESCE_ITEMS:
            self.record(start, len(values), self.scheduler.dumps(values) if blob is None else blob, rank, seconds)
            return
        self.waiting[start] = (values, rank, seconds)
        self.items_waiting += len(values)
        if self.items_waiting >= self.COALESCE_ITEMS:
            self.flush()
        elif self.timer is None:
            self.timer = self.scheduler.call_later(self.COALESCE_SECONDS, self._flush_on_time)

    def _flush_on_time(self) -> None:
        self.timer = None
        try:
            self.flush()
        except Exception:
            pass  # the journal failed: the stream's next record raises it where it can be handled

    def flush(self) -> None:
        """Record every waiting chunk, one record per run of consecutive ones."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting, self.items_waiting = self.waiting, {}, 0
        run: list = []
        first = end = rank = 0
        seconds = 0.0
        for start in sorted(waiting):
            values, by, took = waiting[start]
            if run and start != end:
                self.record(first, len(run), self.scheduler.dumps(run), rank, seconds)
                run = []
            if not run:
                first, seconds = start, 0.0
            run.extend(values)
            end, rank, seconds = start + len(values), by, seconds + took
        if run:
            self.record(first, len(run), self.scheduler.dumps(run), rank, seconds)


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
