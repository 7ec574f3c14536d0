"""Rank 0's scheduling rules as a state machine with no I/O: events in, instructions out.

The :class:`Scheduler` knows the workers, the units in flight, where work
comes from (:mod:`pydra._core.sources`) and the gangs waiting for ranks. It
never touches MPI, threads, asyncio or the clock: the master
(:mod:`pydra._core.master`) turns messages and the passing of time into
events, calls :meth:`Scheduler.handle`, and carries out the instructions it
returns. Tests feed it events directly (``tests/core/test_scheduler.py``).

A worker is in one :class:`~pydra._core.phases.Phase` at a time;
:data:`~pydra._core.phases.TRANSITIONS` lists every allowed move and the
trigger that makes it, and :meth:`Scheduler._move` is the only place a phase
changes. The rules, each in one method:

* dispatch (:meth:`_dispatch`): units are dealt one per worker per round to
  the workers with room, the least busy first, so idle workers are served
  before queues grow; each worker's share becomes one :class:`Send`;
* pipeline depth (:meth:`_adapt_pipeline`): about ``pipeline_seconds`` of
  work queued at each worker, between ``depth`` and :data:`MAX_INFLIGHT`
  units;
* gang reservation (:meth:`_start_gangs`): workers are held for the first
  waiting gang (idle ones first, then the least busy, which finish what they
  have), nothing else lands on them, and the gang starts once they are all
  idle;
* the loss cascade (:meth:`lose_worker`): a lost worker's units fail with
  :class:`~pydra.errors.WorkerLost` (their sources reschedule them), gang
  members stuck in a collective with it are lost too (unless MPI raises in a
  collective that meets a dead rank: ULFM), and with no worker left rank 0
  takes the work over (unless ``take_over`` is off: a service's rank 0 runs
  no task code, and says :class:`NoWorkerLeft` once every worker is lost);
* heartbeats and timers (:class:`Tick`), draining and the stop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from pydra._core import protocol
from pydra._core.events import (
    AbortIfStuck, Beat, Dispatch, Heard, Lost, NoWorkerLeft, Progress, RepliesReceived, Send, SendCancel, StopRequested,
    TakeOver, Tick, WorkerGone,
)
from pydra._core.phases import TAKES_WORK, TRANSITIONS, Phase, Trigger, Worker
from pydra._core.protocol import Failure
from pydra._core.sources import Callback, CallQueue, GangRequest, Source
from pydra.errors import WorkerLost

#: most units in flight to one worker, however tiny they are.
MAX_INFLIGHT = 64


@dataclass(slots=True)
class PendingUnit:
    """A unit sent to one or more workers whose replies are awaited."""

    callback: Callback
    ranks: Sequence[int]
    replies_due: int


@dataclass
class Timer:
    """A callback due at *when* (see :meth:`Scheduler.call_later`)."""

    when: float
    order: int
    callback: Callable[..., None]
    args: tuple
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return (self.when, self.order) < (other.when, other.order)


@dataclass
class Settings:
    """The scheduler's knobs (read from ``PYDRA_*`` settings by the master)."""

    depth: int = 2
    pipeline_seconds: float = 0.002
    batch_seconds: float = 0.02
    heartbeat: float = 0.5
    #: None: no heartbeats (an MPI without MPI_THREAD_MULTIPLE), a silent worker is only busy
    heartbeat_timeout: float | None = None
    #: MPI raises in a collective that meets a dead rank (ULFM), so its other members are not stuck
    collectives_raise: bool = False


class Scheduler:
    """Schedules units onto workers *ranks* (``[0]`` alone: rank 0 runs everything itself).

    *hosts* maps every rank of the job (0 included) to its host; *dumps*
    pickles definitions (the master's serializer); *now* is the clock of
    the events to come.
    """

    def __init__(self, ranks: list[int], hosts: dict[int, str], settings: Settings,
                 dumps: Callable[[Any], bytes], size: int, now: float = 0.0) -> None:
        self.settings = settings
        self.dumps = dumps
        self.size = size  # of the job, for "Worker r of n" in failures made here
        self.host = hosts[0]
        self.now = now
        self.workers = [Worker(rank, hosts[rank], last_heard=now) for rank in ranks]
        self._by_rank = {worker.rank: worker for worker in self.workers}
        self.least_retries = 0  # a service's admin may raise it (config retries N)
        self.take_over = True  # with no worker left, rank 0 runs the work itself (a service turns it off)
        self.inflight_limit = max(1, settings.depth)
        self._unit_seconds: float | None = None  # running mean of worker time per unit
        self.calls = CallQueue()
        self.sources: list[Source] = [self.calls]
        self.gangs: deque[GangRequest] = deque()
        self.pending: dict[int, PendingUnit] = {}
        self.progress: dict[int, tuple] = {}
        self._uids = itertools.count(1)
        self._tids = itertools.count(1)
        self._tid_of: dict[int, int] = {}  # id(obj) -> tid
        self._definitions: dict[int, tuple[Any, bytes | protocol.AsIs]] = {}  # tid -> (obj, its pickle)
        self._alone = ranks == [0]  # one process: rank 0 runs every unit itself, and nothing is pickled
        self._timers: list[Timer] = []
        self._timer_order = itertools.count()
        self._next_heartbeat_check = 0.0
        self._next_beat = 0.0
        self.walks = 0  # tree walks running: the stop waits for them
        self.stopping = False
        self.stop_sent = False
        self.broken: str | None = None  # why a gang failed: some members may never answer again
        #: lost ranks known to be blocked in a collective with another lost rank: only MPI_Abort frees them
        self.stuck_ranks: list[int] = []
        self._out: list = []

    # -- events ---------------------------------------------------------------------------------

    def handle(self, event: Any) -> list:
        """Take one event; return the instructions it gives rise to, in order."""
        handler = self._handlers[type(event)]
        handler(self, event)
        out, self._out = self._out, []
        return out

    def _on_tick(self, event: Tick) -> None:
        self.now = event.now
        while self._timers and self._timers[0].when <= event.now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback(*timer.args)
        self._check_heartbeats()
        self._beat()

    def _on_dispatch(self, event: Dispatch) -> None:
        self.now = event.now
        self._dispatch()
        if self.stopping and not self.stop_sent and self._work_done():
            self._send_stop()

    def _on_replies(self, event: RepliesReceived) -> None:
        self.now = event.now
        worker = self._by_rank[event.rank]
        if worker.alive:  # a lost worker's word no longer counts: its units were rescheduled
            worker.last_heard = event.now
            self._take_replies(worker, event.replies)

    def _on_heard(self, event: Heard) -> None:
        worker = self._by_rank[event.rank]
        if worker.alive:
            worker.last_heard = event.now
            if event.usage is not None:
                self._note_usage(worker, event.usage)

    def _on_progress(self, event: Progress) -> None:
        if self._by_rank[event.rank].alive:
            self.progress[event.uid] = (event.rank, event.done, event.total, event.message)

    def _on_gone(self, event: WorkerGone) -> None:
        self.lose_worker(event.rank, event.reason, event.dead)

    def _on_stop(self, event: StopRequested) -> None:
        self.stopping = True
        for source in self.sources:
            source.finish_up()

    _handlers = {
        Tick: _on_tick, Dispatch: _on_dispatch, RepliesReceived: _on_replies, Heard: _on_heard,
        Progress: _on_progress, WorkerGone: _on_gone, StopRequested: _on_stop,
    }

    # -- phases ---------------------------------------------------------------------------------

    def _move(self, worker: Worker, trigger: Trigger) -> None:
        phase = TRANSITIONS.get((worker.phase, trigger))
        if phase is None:
            raise AssertionError(f"worker {worker.rank}: no move from {worker.phase.value} on {trigger.value}")
        worker.phase = phase

    # -- queries (any thread may read them: plain attributes) ----------------------------------------

    @property
    def lost_ranks(self) -> list[int]:
        """The workers declared lost so far."""
        return [worker.rank for worker in self.workers if not worker.alive]

    def alive_workers(self) -> int:
        """How many workers can still take work (not lost, not drained)."""
        return sum(worker.phase not in (Phase.LOST, Phase.DRAINING, Phase.DRAINED) for worker in self.workers)

    @property
    def finished(self) -> bool:
        """The stop has been sent and answered: nothing more will happen."""
        return self.stop_sent and not any(worker.inflight for worker in self.workers)

    def inflight(self) -> bool:
        """Whether replies are due (the master polls eagerly while they are)."""
        return any(worker.inflight for worker in self.workers)

    def next_deadline(self) -> float | None:
        """When the next timer is due, or None."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].when if self._timers else None

    # -- calls from sources, walkers and admins (scheduler thread) -------------------------------------

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        """Run *callback(\\*args)* at the first :class:`Tick` at least *delay* seconds from now."""
        timer = Timer(self.now + delay, next(self._timer_order), callback, args)
        heapq.heappush(self._timers, timer)
        return timer

    def define(self, obj: Any) -> int:
        """Register *obj* and return its id; pickled once now (not in one process), sent when a worker first needs it."""
        tid = self._tid_of.get(id(obj))
        if tid is None or self._definitions[tid][0] is not obj:
            tid = next(self._tids)
            blob = protocol.AsIs(obj) if self._alone else self.dumps(obj)
            self._definitions[tid] = (obj, blob)  # keeping obj alive keeps id(obj) unique
            self._tid_of[id(obj)] = tid
        return tid

    def new_run_id(self) -> int:
        """A fresh id for state that workers keep per run (a MapReduce's buffered pairs)."""
        return next(self._tids)

    def add_source(self, source: Source) -> None:
        self.sources.append(source)
        if self.stopping:
            source.finish_up()

    def add_gang(self, request: GangRequest) -> None:
        available = self.alive_workers()
        if request.count > available:
            raise ValueError(f"the gang needs {request.count} worker ranks; this job has {available}")
        self.gangs.append(request)

    def cancel(self, uids: Iterable[int]) -> None:
        """Drop the units *uids*: their replies will be ignored, their tasks see ``cancelled``."""
        by_rank: dict[int, list[int]] = {}
        for uid in uids:
            unit = self.pending.pop(uid, None)
            if unit is not None:
                for rank in unit.ranks:
                    by_rank.setdefault(rank, []).append(uid)
        for rank, dropped in by_rank.items():
            self._out.append(SendCancel(rank, dropped))

    def drain(self, rank: int) -> None:
        """Let worker *rank* finish its units and give it no more."""
        worker = self._by_rank[rank]
        if worker.phase in TAKES_WORK:
            self._move(worker, Trigger.DRAIN)

    def undrain(self, rank: int) -> None:
        """Let a drained (or draining) worker take work again."""
        worker = self._by_rank[rank]
        if worker.phase in (Phase.DRAINING, Phase.DRAINED):
            self._move(worker, Trigger.UNDRAIN)

    def forget_run(self, run: int, ranks: Iterable[int]) -> None:
        """Tell *ranks* to drop what they keep for *run*."""
        for rank in ranks:
            worker = self._by_rank[rank]
            if worker.alive:
                self._send(worker, [(protocol.FORGET, run)])

    def load_target(self, spec: Any) -> None:
        """Have every worker load a task file (a job submitted to a running service)."""
        for worker in self.workers:
            if worker.alive and worker.rank != 0:
                self._send(worker, [(protocol.LOAD, spec)])

    def restart(self, rank: int) -> None:
        """Have an isolated worker start a new child process for its next unit."""
        worker = self._by_rank[rank]
        if worker.alive and worker.rank != 0:
            self._send(worker, [(protocol.RESTART,)])

    # -- dispatch -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._start_gangs()
        limit = self.inflight_limit
        room = {w.rank: limit - w.inflight for w in self.workers if w.phase in TAKES_WORK}
        # The least busy first (ties in rank order): a unit that comes alone runs beside the others,
        # not queued behind one of them.
        ready = sorted((rank for rank, free in room.items() if free > 0), key=room.__getitem__, reverse=True)
        shares: dict[int, list[tuple]] = {rank: [] for rank in ready}
        pending, next_unit = self.pending, self._next_unit  # locals: the loop runs once per unit
        while ready:
            filled = False
            for rank in ready:
                unit = next_unit(rank)
                if unit is None:
                    room[rank] = 0  # nothing for this one (a retry may be waiting for another)
                    filled = True
                    continue
                command, callback = unit
                pending[command[1]] = PendingUnit(callback, (rank,), 1)
                shares[rank].append(command)
                room[rank] -= 1
                filled = filled or not room[rank]
            if filled:
                ready = [rank for rank in ready if room[rank] > 0]
        for rank, commands in shares.items():
            if commands:
                self._send(self._by_rank[rank], commands)

    def _next_unit(self, rank: int) -> tuple[tuple, Callback] | None:
        for source in self.sources:
            unit = source.next_unit(next(self._uids), rank)
            if unit is not None:
                return unit
        if any(source.finished for source in self.sources):
            self.sources = [source for source in self.sources if not source.finished]
        return None

    def _send(self, worker: Worker, commands: list[tuple], gang: bool = False) -> None:
        """Count *commands* as in flight at *worker* and emit them, with the definitions it lacks first."""
        definitions = []
        units = 0
        for command in commands:
            op = command[0]
            if op in protocol.USES_DEFINITION:
                tid = command[2]
                if tid not in worker.known:
                    worker.known.add(tid)
                    definitions.append((protocol.DEFINE, tid, self._definitions[tid][1]))
            if op not in protocol.NO_REPLY:
                units += 1
        if units:
            worker.inflight += units
            self._move(worker, Trigger.GANG if gang else Trigger.SENT)
        self._out.append(Send(worker.rank, definitions + commands if definitions else commands))

    # -- gangs ----------------------------------------------------------------------------------

    def _start_gangs(self) -> None:
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
                # Idle workers first, then the least busy: a busy one finishes what it has and
                # takes nothing more, so a steady stream of small units cannot starve the gang.
                candidates = sorted((w for w in self.workers if w.phase in TAKES_WORK and w not in gang.held),
                                    key=lambda w: w.inflight)
                gang.held.extend(candidates[: gang.count - len(gang.held)])
                team = gang.held
            for worker in team:
                if worker.phase is not Phase.RESERVED:
                    self._move(worker, Trigger.HELD)  # nothing else may start here meanwhile
            if len(team) < gang.count or any(worker.phase is not Phase.RESERVED or worker.inflight for worker in team):
                return
            self.gangs.popleft()
            members = sorted(worker.rank for worker in team)
            uid = next(self._uids)
            self.pending[uid] = PendingUnit(self._gang_callback(uid, gang, members), members, len(members))
            command = gang.make_command(uid, members)
            for worker in team:
                worker.gang_uid = uid
                self._send(worker, [command], gang=True)

    def _gang_callback(self, uid: int, gang: GangRequest, members: list) -> Callback:
        """Collects the members' replies; the gang's result is them all, in member order.

        After a failure the unit is given up (the others' replies no longer
        count), so that the stop need not wait for members that may never
        answer.
        """
        results: dict[int, Any] = {}
        failed = False

        def callback(ok: bool, value: Any, seconds: float, rank: int, blob: bytes | None) -> None:
            nonlocal failed
            if failed:
                return
            if not ok:
                failed = True
                self.pending.pop(uid, None)
                lost = isinstance(value.exception, WorkerLost)
                error = value.to_exception(f"in a gang on ranks {members}")
                if not lost:
                    # The other members may be blocked in a collective with the failed one. (The
                    # failure itself, traceback and all, is the gang's caller's to report.)
                    self.broken = f"{type(value.exception).__name__} on rank {rank}, in a gang on ranks {members}"
                gang.callback(None, error)
                if lost and not self._collective_raises(rank):
                    # Those still in the gang's collectives wait for the lost rank forever, and
                    # MPI cannot free them: they are lost too. (The gang runs again elsewhere.)
                    for member in members:
                        if member != rank and member not in results and self._by_rank[member].alive:
                            self.stuck_ranks.append(member)
                            self.lose_worker(member, f"was in a collective with lost rank {rank}")
                return
            results[rank] = value
            if len(results) == len(members):
                gang.callback([results[rank] for rank in members], None)

        return callback

    # -- replies --------------------------------------------------------------------------------

    def _take_replies(self, worker: Worker, replies: list[tuple]) -> None:
        worker.inflight -= len(replies)
        if worker.gang_uid is not None and any(reply[0] == worker.gang_uid for reply in replies):
            worker.gang_uid = None
        else:
            self._adapt_pipeline(sum(reply[3] for reply in replies) / len(replies))
        if not worker.inflight:
            self._move(worker, Trigger.EMPTIED)
        pending, progress, rank = self.pending, self.progress, worker.rank
        done = failures = 0
        busy = 0.0
        for uid, ok, value, seconds, blob in replies:
            busy += seconds
            if progress:
                progress.pop(uid, None)
            unit = pending.get(uid)
            if unit is None:
                continue  # cancelled, or a STOP acknowledgement: neither done nor failed
            done += 1
            if not ok:
                failures += 1
            unit.replies_due -= 1
            if unit.replies_due == 0:
                del pending[uid]
            unit.callback(ok, value, seconds, rank, blob)
        worker.busy_seconds += busy
        worker.units_done += done
        worker.failures += failures

    def _adapt_pipeline(self, seconds: float) -> None:
        """Keep about ``pipeline_seconds`` of work queued at each worker.

        *seconds* is the worker time of one unit. Long units need only
        ``depth`` units in flight; tiny ones need many, or the worker
        finishes before rank 0 can send the next.
        """
        mean = self._unit_seconds
        mean = seconds if mean is None else 0.8 * mean + 0.2 * seconds
        self._unit_seconds = mean
        depth = max(1, self.settings.depth)
        self.inflight_limit = max(depth, min(MAX_INFLIGHT, int(self.settings.pipeline_seconds / max(mean, 1e-6))))

    def _note_usage(self, worker: Worker, usage: tuple) -> None:
        # *when*: the worker's clock (beats may arrive bunched). At least 0: a task process may end mid-beat.
        (previous_cpu, *_, previous_time), (cpu, *_, when) = worker.usage, usage
        if previous_time and when > previous_time:
            worker.cpu_percent = max(0.0, 100.0 * (cpu - previous_cpu) / (when - previous_time))
        worker.usage = tuple(usage)

    # -- heartbeats and losses ------------------------------------------------------------------

    def _beat(self) -> None:
        """Tell the workers rank 0 lives: one whose master falls silent ends itself."""
        if self.settings.heartbeat_timeout is None or self.stop_sent or self.now < self._next_beat:
            return  # (after STOP, a worker may be in MPI_Finalize: send it nothing more)
        self._next_beat = self.now + self.settings.heartbeat
        ranks = [worker.rank for worker in self.workers if worker.alive and worker.rank != 0]
        if ranks:
            self._out.append(Beat(ranks))

    def _check_heartbeats(self) -> None:
        timeout = self.settings.heartbeat_timeout
        if timeout is None or self.now < self._next_heartbeat_check:
            return
        self._next_heartbeat_check = self.now + min(1.0, timeout / 10)
        for worker in self.workers:
            silence = self.now - worker.last_heard
            if worker.alive and worker.rank != 0 and silence > timeout:
                self.lose_worker(worker.rank, f"no heartbeat for {silence:.1f} s")

    def _collective_raises(self, rank: int) -> bool:
        """Whether a gang whose member *rank* failed with WorkerLost frees its other members.

        Under ULFM a collective that meets a dead rank raises on the others:
        *rank* died, or is a member that MPI told so. A rank lost to silence
        may be alive, and the others may wait for it forever.
        """
        worker = self._by_rank[rank]
        return self.settings.collectives_raise and (worker.alive or worker.dead)

    def lose_worker(self, rank: int, reason: str, dead: bool = False) -> None:
        """Declare worker *rank* lost: no more work for it, its units fail with WorkerLost.

        *dead*: its process is known to have ended (see :class:`WorkerGone`).
        """
        worker = self._by_rank[rank]
        if not worker.alive:
            return
        worker.dead = dead
        self._move(worker, Trigger.LOST)
        worker.gang_uid, worker.inflight = None, 0
        self._out.append(Lost(rank, worker.host, reason))
        lost = WorkerLost(f"rank {rank} on {worker.host} was lost: {reason}")
        failure = Failure.capture(lost, rank, self.size, worker.host)
        for uid in [uid for uid, unit in self.pending.items() if rank in unit.ranks]:
            unit = self.pending.pop(uid, None)  # a callback may have dropped it meanwhile
            if unit is not None:
                self.progress.pop(uid, None)
                unit.callback(False, failure, 0.0, rank, None)
        for gang in self.gangs:
            if worker in gang.held:
                gang.held.remove(worker)
        if not self.alive_workers() and not any(w.rank == 0 for w in self.workers):
            self._take_over()

    def _take_over(self) -> None:
        """Every worker is lost: rank 0 runs the rest of the work itself, as a one-process job does."""
        if not self.take_over:  # the work waits for a drained worker to come back, or fails if none is left
            if not any(worker.alive for worker in self.workers):
                self._out.append(NoWorkerLeft())
            return
        itself = Worker(0, self.host, last_heard=self.now)
        self.workers.append(itself)
        self._by_rank[0] = itself
        self._out.append(TakeOver())

    # -- the stop -------------------------------------------------------------------------------

    def _work_done(self) -> bool:
        """Whether everything submitted before the stop has been answered (or given up)."""
        if self.pending or self.gangs or self.walks or self.calls:
            return False
        return all(source.finished for source in self.sources if source is not self.calls)

    def _send_stop(self) -> None:
        self.stop_sent = True
        if self.broken:
            # A failed gang left members blocked in a collective that will never
            # complete; MPI offers no way to free them, so the job may have to end.
            self._out.append(AbortIfStuck(f"pydra: a gang task failed ({self.broken}) and left ranks blocked in MPI;"
                                          " aborting the job\n", 2.0))
        # After a loss, MPI_Finalize would wait for the lost ranks forever: the workers
        # must end their processes instead (and so must rank 0, see lost_ranks).
        exit_process = bool(self.lost_ranks)
        for worker in self.workers:
            stop = (protocol.STOP, next(self._uids), exit_process)
            if worker.alive:
                self._send(worker, [stop])
            elif worker.rank != 0:  # it may be alive after all (stuck, or slow): tell it too
                self._out.append(Send(worker.rank, [stop]))

    # -- observation ----------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """A snapshot of the workers and the queue, for status displays (*now*: the caller's clock)."""
        return {
            "workers": [
                {
                    "rank": w.rank,
                    "host": w.host,
                    "state": w.phase.value,
                    "units_inflight": w.inflight,
                    "units_done": w.units_done,
                    "failures": w.failures,
                    "busy_seconds": w.busy_seconds,
                    "cpu_percent": w.cpu_percent,
                    "memory_bytes": w.usage[1] or None, "threads": w.usage[2] or None,
                    "last_heard": w.last_heard,
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
