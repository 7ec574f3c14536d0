"""The scheduling rules of pydra._core.scheduler, fed events in one process: no MPI, no threads, no clock.

Each test builds a Scheduler over workers 1 and 2 (rank 0 schedules), feeds
it events (replies, ticks of a made-up clock, losses, a stop) and checks
the instructions it returns and the state it is in. The end-to-end behaviour
of the same rules over real ranks is in the mpiexec tests beside this file.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import subprocess
import sys

import pytest

from pydra._core import protocol
from pydra._core.protocol import Failure
from pydra._core.events import (
    AbortIfStuck, Beat, Dispatch, Heard, Lost, NoWorkerLeft, RepliesReceived, Send, SendCancel, StopRequested, TakeOver,
    Tick,
    WorkerGone,
)
from pydra._core.phases import TRANSITIONS, Phase, Trigger
from pydra._core.scheduler import MAX_INFLIGHT, Scheduler, Settings
from pydra._core.sources import ChunkStream, GangRequest, RetryPolicy
from pydra.errors import WorkerLost

HOSTS = {0: "head", 1: "node1", 2: "node2"}


def make(workers=(1, 2), **settings) -> Scheduler:
    options = {"heartbeat_timeout": 10.0, **settings}
    return Scheduler(list(workers), HOSTS, Settings(**options), pickle.dumps, size=len(workers) + 1, now=0.0)


def sends(instructions: list) -> dict[int, list]:
    """The commands sent, by rank."""
    out: dict[int, list] = {}
    for instruction in instructions:
        if isinstance(instruction, Send):
            out.setdefault(instruction.rank, []).extend(instruction.commands)
    return out


def ops(commands: list) -> list:
    return [command[0] for command in commands]


def ok(uid, value=None, seconds=0.001):
    return (uid, True, value, seconds, None)


def failed(uid, error: BaseException, rank=1, seconds=0.001):
    return (uid, False, Failure.capture(error, rank, 3, HOSTS[rank]), seconds, None)


class Calls:
    """Executor.submit's side: queue calls, record what comes back."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler, self.results = scheduler, {}

    def submit(self, name: str) -> None:
        results = self.results

        class Call:
            def command(self, uid):
                return (protocol.CALL, uid, name, (), {})

            def reply(self, ok, value, seconds, rank, blob):
                results[name] = (ok, value if ok else type(value.exception).__name__, rank)

            def withdraw(self):
                return False

        self.scheduler.calls.add(Call())


class Sink:
    """A stream's outcome, recorded."""

    def __init__(self) -> None:
        self.values, self.failures, self.finished = {}, [], False

    def chunk(self, chunk, values, rank):
        self.values[chunk.start] = (values, rank)

    def unit_failed(self, chunk, error):
        self.failures.append((chunk.start, error))

    def fail(self, error, start):
        self.failures.append((start, error))

    def done(self):
        self.finished = True


def stream(scheduler: Scheduler, items, chunksize=1, policy=RetryPolicy()) -> Sink:
    sink = Sink()
    make_command = lambda uid, chunk: (protocol.MAP, uid, 7, chunk, False)  # noqa: E731
    scheduler._definitions[7] = ("f", b"blob")  # a definition, as Scheduler.define would register it
    scheduler.add_source(ChunkStream(scheduler, make_command, items, chunksize, sink, policy=policy))
    return sink


# -- dispatch and the pipeline ----------------------------------------------------------------------


def test_a_definition_is_pickled_once_for_workers_and_not_at_all_in_one_process() -> None:
    """With workers, define pickles now (an unpicklable function fails its caller at once); rank 0
    alone (a one-process job) runs the object itself, as it runs calls without pickling them."""
    function = lambda x: x  # noqa: E731  (pickle refuses a local lambda)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        make().define(function)

    def first_definition(scheduler: Scheduler, obj) -> tuple:
        tid = scheduler.define(obj)
        make_command = lambda uid, chunk: (protocol.MAP, uid, tid, chunk, False)  # noqa: E731
        scheduler.add_source(ChunkStream(scheduler, make_command, [1], 1, Sink()))
        (_, (define, _)), *_ = sends(scheduler.handle(Dispatch(0.0))).items()
        assert define[:2] == (protocol.DEFINE, tid)
        return define[2]

    assert pickle.loads(first_definition(make(), len)) is len
    assert first_definition(make(workers=(0,)), function) == protocol.AsIs(function)


def test_units_are_dealt_round_robin_one_message_per_worker_up_to_the_pipeline_depth() -> None:
    scheduler, calls = make(depth=2), None
    calls = Calls(scheduler)
    for name in "abcde":
        calls.submit(name)
    sent = sends(scheduler.handle(Dispatch(0.0)))
    assert [c[2] for c in sent[1]] == ["a", "c"] and [c[2] for c in sent[2]] == ["b", "d"]  # e waits for room
    assert [w.inflight for w in scheduler.workers] == [2, 2]
    assert [w.phase for w in scheduler.workers] == [Phase.BUSY, Phase.BUSY]
    uid = sent[1][0][1]
    sent = sends(scheduler.handle(RepliesReceived(1, [ok(uid, "A")], 0.1)) + scheduler.handle(Dispatch(0.1)))
    assert calls.results["a"] == (True, "A", 1)
    assert [c[2] for c in sent[1]] == ["e"] and 2 not in sent


def test_a_call_that_comes_alone_goes_to_an_idle_worker_before_a_busy_one() -> None:
    """Each pass deals to the least busy workers first: a second call, submitted after the first was sent,
    runs beside it on the idle worker rather than queue behind it (seen on a busy box: both on rank 1)."""
    scheduler = make(depth=2)
    calls = Calls(scheduler)
    calls.submit("a")
    assert [c[2] for c in sends(scheduler.handle(Dispatch(0.0)))[1]] == ["a"]
    calls.submit("b")
    assert [c[2] for c in sends(scheduler.handle(Dispatch(0.0)))[2]] == ["b"]
    for name in "cd":
        calls.submit(name)
    sent = sends(scheduler.handle(Dispatch(0.0)))
    assert [c[2] for c in sent[1]] == ["c"] and [c[2] for c in sent[2]] == ["d"]  # then round robin again


def test_a_definition_goes_to_each_worker_once_before_its_first_use() -> None:
    scheduler = make(depth=4)
    stream(scheduler, range(10))
    sent = sends(scheduler.handle(Dispatch(0.0)))
    for rank in (1, 2):
        assert ops(sent[rank]) == [protocol.DEFINE] + [protocol.MAP] * 4
    replies = [ok(c[1], [0]) for c in sent[1] if c[0] == protocol.MAP]
    sent = sends(scheduler.handle(RepliesReceived(1, replies, 0.1)) + scheduler.handle(Dispatch(0.1)))
    assert protocol.DEFINE not in ops(sent[1])


def test_tiny_units_deepen_the_pipeline_and_long_ones_bring_it_back() -> None:
    scheduler = make(depth=2, pipeline_seconds=0.002)
    calls = Calls(scheduler)
    for _ in range(500):
        calls.submit("x")
    sent = sends(scheduler.handle(Dispatch(0.0)))
    scheduler.handle(RepliesReceived(1, [ok(c[1], seconds=1e-6) for c in sent[1]], 0.1))
    assert scheduler.inflight_limit == MAX_INFLIGHT
    outstanding = sends(scheduler.handle(Dispatch(0.1)))[1]
    assert len(outstanding) == MAX_INFLIGHT  # rank 1's pipeline is deep now
    for step in range(40):  # long units: the running mean climbs, the depth falls back to PYDRA_PIPELINE
        scheduler.handle(RepliesReceived(1, [ok(outstanding[0][1], seconds=1.0)], 1.0 + step))
        outstanding = outstanding[1:] + sends(scheduler.handle(Dispatch(1.0 + step))).get(1, [])
    assert scheduler.inflight_limit == 2


# -- failures, retries, losses ------------------------------------------------------------------------


def test_a_failed_chunk_is_split_and_retried_elsewhere_after_its_delay() -> None:
    scheduler = make(depth=1)
    sink = stream(scheduler, range(4), chunksize=2, policy=RetryPolicy(retries=1, delay=0.5))
    first = sends(scheduler.handle(Dispatch(0.0)))
    assert ([c[3] for c in first[1] if c[0] == protocol.MAP], [c[3] for c in first[2] if c[0] == protocol.MAP]) == (
        [[0, 1]], [[2, 3]])
    scheduler.handle(RepliesReceived(1, [failed(first[1][-1][1], ValueError("bad"), seconds=1.0)], 0.1))
    # split into single items (no try used up), kept away from rank 1 while rank 2 can take them
    assert sends(scheduler.handle(Dispatch(0.1))) == {}
    scheduler.handle(RepliesReceived(2, [ok(first[2][-1][1], [4, 9], seconds=1.0)], 0.2))
    item0 = sends(scheduler.handle(Dispatch(0.2)))[2]
    assert [c[3] for c in item0] == [[0]]
    scheduler.handle(RepliesReceived(2, [failed(item0[0][1], ValueError("again"), rank=2, seconds=1.0)], 0.3))
    item1 = sends(scheduler.handle(Dispatch(0.3)))
    assert [c[3] for c in item1[2]] == [[1]] and 1 not in item1  # item 0 sits out its delay
    scheduler.handle(Tick(0.7))
    assert sends(scheduler.handle(Dispatch(0.7))) == {}
    scheduler.handle(Tick(0.8))  # 0.5 s after its failure: tried again, away from rank 2
    retry = sends(scheduler.handle(Dispatch(0.8)))
    assert [c[3] for c in retry[1]] == [[0]]
    scheduler.handle(RepliesReceived(1, [ok(retry[1][0][1], [0], seconds=1.0)], 0.9))
    scheduler.handle(RepliesReceived(2, [ok(item1[2][0][1], [1], seconds=1.0)], 0.9))
    assert sink.finished and not sink.failures
    assert {start: values for start, (values, _) in sink.values.items()} == {0: [0], 1: [1], 2: [4, 9]}


def test_a_lost_worker_fails_its_units_and_its_calls_run_again_elsewhere() -> None:
    scheduler = make(depth=1)
    calls = Calls(scheduler)
    calls.submit("a")
    calls.submit("b")
    sent = sends(scheduler.handle(Dispatch(0.0)))
    out = scheduler.handle(WorkerGone(1, "its supervisor saw it die"))
    assert Lost(1, "node1", "its supervisor saw it die") in out
    assert scheduler.workers[0].phase is Phase.LOST and scheduler.lost_ranks == [1]
    scheduler.handle(RepliesReceived(2, [ok(sent[2][0][1], "B")], 0.1))
    again = sends(scheduler.handle(Dispatch(0.1)))
    assert [c[2] for c in again[2]] == ["a"]  # rescheduled on the survivor, with a new uid
    assert again[2][0][1] != sent[1][0][1]
    late = scheduler.handle(RepliesReceived(1, [ok(sent[1][0][1], "late")], 0.2))  # the lost rank's word
    assert late == [] and "a" not in calls.results


def test_a_call_that_loses_two_workers_fails_rather_than_kill_the_rest() -> None:
    scheduler = make(depth=1)
    calls = Calls(scheduler)
    calls.submit("poison")
    (first,) = sends(scheduler.handle(Dispatch(0.0)))
    scheduler.handle(WorkerGone(first, "killed by the call"))
    again = sends(scheduler.handle(Dispatch(0.1)))
    (second,) = again
    assert second != first and [c[2] for c in again[second]] == ["poison"]  # once more, elsewhere
    out = scheduler.handle(WorkerGone(second, "killed by the call"))
    assert calls.results == {"poison": (False, "WorkerLost", second)}  # a BrokenExecutor, as a pool says
    assert issubclass(WorkerLost, concurrent.futures.BrokenExecutor)
    assert TakeOver() in out and sends(scheduler.handle(Dispatch(0.2))) == {}  # rank 0 does not run it


def test_silence_past_the_heartbeat_timeout_loses_a_worker_and_rank_0_beats() -> None:
    scheduler = make(heartbeat=0.5, heartbeat_timeout=10.0)
    first = scheduler.handle(Tick(0.0))
    assert Beat([1, 2]) in first
    scheduler.handle(Heard(2, 9.0))
    out = scheduler.handle(Tick(10.5))
    assert [i.rank for i in out if isinstance(i, Lost)] == [1]
    assert Beat([2]) in out


def test_heartbeats_give_each_workers_cpu_share_memory_and_threads() -> None:
    scheduler = make()
    scheduler.handle(Heard(1, 1.0, protocol.Usage(2.0, 64 << 20, 5, 100.0)))
    first = {w["rank"]: w for w in scheduler.statistics()["workers"]}
    assert first[1]["cpu_percent"] is None and first[1]["memory_bytes"] == 64 << 20 and first[1]["threads"] == 5
    assert first[2]["memory_bytes"] is None and first[2]["threads"] is None  # not heard from yet
    # The worker's own clock times its CPU: a heartbeat that arrives late changes nothing.
    scheduler.handle(Heard(1, 9.0, protocol.Usage(2.5, 80 << 20, 3, 101.0)))
    worker = scheduler.statistics()["workers"][0]
    assert worker["cpu_percent"] == 50.0 and worker["memory_bytes"] == 80 << 20 and worker["threads"] == 3
    # A task process that ended between two reads of one heartbeat counted twice there: no negative share after.
    scheduler.handle(Heard(1, 10.0, protocol.Usage(2.4, 80 << 20, 3, 102.0)))
    assert scheduler.statistics()["workers"][0]["cpu_percent"] == 0.0


def test_every_worker_lost_rank_0_takes_over() -> None:
    scheduler = make()
    scheduler.handle(WorkerGone(1, "gone"))
    out = scheduler.handle(WorkerGone(2, "gone"))
    assert TakeOver() in out
    calls = Calls(scheduler)
    calls.submit("x")
    assert ops(sends(scheduler.handle(Dispatch(1.0)))[0]) == [protocol.CALL]


def test_without_take_over_rank_0_runs_nothing_and_says_when_no_worker_is_left() -> None:
    """A service's rank 0 (the control plane and every job) never runs task code, isolated or not."""
    scheduler = make()
    scheduler.take_over = False
    calls = Calls(scheduler)
    calls.submit("x")
    (first,) = sends(scheduler.handle(Dispatch(0.0)))
    scheduler.drain(3 - first)
    out = scheduler.handle(WorkerGone(first, "gone"))
    assert NoWorkerLeft() not in out and TakeOver() not in out  # the drained worker is still there
    assert sends(scheduler.handle(Dispatch(0.1))) == {}  # and the call waits for it
    scheduler.undrain(3 - first)
    assert [c[2] for c in sends(scheduler.handle(Dispatch(0.2)))[3 - first]] == ["x"]
    out = scheduler.handle(WorkerGone(3 - first, "gone"))
    assert NoWorkerLeft() in out and TakeOver() not in out
    assert sends(scheduler.handle(Dispatch(0.3))) == {} and 0 not in [w.rank for w in scheduler.workers]


# -- gangs --------------------------------------------------------------------------------------------


def gang(scheduler: Scheduler, count: int, members=None) -> dict:
    outcome: dict = {}
    make_command = lambda uid, ranks: (protocol.GANG, uid, 9, ranks, ())  # noqa: E731
    scheduler._definitions[9] = ("g", b"gang")
    scheduler.add_gang(GangRequest(make_command, lambda values, error: outcome.update(v=values, e=error), count, members))
    return outcome


def test_a_gang_holds_idle_workers_until_it_has_enough_and_nothing_else_lands_on_them() -> None:
    scheduler = make(depth=1)
    calls = Calls(scheduler)
    calls.submit("busy")
    sent = sends(scheduler.handle(Dispatch(0.0)))  # rank 1 busy, rank 2 idle
    outcome = gang(scheduler, 2)
    calls.submit("later")
    held = sends(scheduler.handle(Dispatch(0.1)))
    assert held == {}  # both held for the gang, rank 1 finishing its call: "later" waits
    assert [w.phase for w in scheduler.workers] == [Phase.RESERVED, Phase.RESERVED]
    scheduler.handle(RepliesReceived(1, [ok(sent[1][0][1])], 0.2))
    started = sends(scheduler.handle(Dispatch(0.2)))
    assert ops(started[1]) == ops(started[2]) == [protocol.DEFINE, protocol.GANG]
    uid = started[1][-1][1]
    assert [w.phase for w in scheduler.workers] == [Phase.GANG, Phase.GANG]
    scheduler.handle(RepliesReceived(2, [ok(uid, "two")], 0.3))
    scheduler.handle(RepliesReceived(1, [ok(uid, "one")], 0.3))
    assert outcome == {"v": ["one", "two"], "e": None}
    assert [c[2] for c in sends(scheduler.handle(Dispatch(0.4)))[1]] == ["later"]


def test_a_gang_member_lost_takes_the_members_still_in_its_collective_with_it() -> None:
    scheduler = make()
    outcome = gang(scheduler, 2)
    uid = sends(scheduler.handle(Dispatch(0.0)))[1][-1][1]
    out = scheduler.handle(WorkerGone(1, "killed"))
    assert isinstance(outcome["e"], WorkerLost)
    assert sorted(i.rank for i in out if isinstance(i, Lost)) == [1, 2]  # rank 2 waits for rank 1 forever
    assert TakeOver() in out and uid not in scheduler.pending
    assert scheduler.stuck_ranks == [2]  # only MPI_Abort ends it; rank 1 is merely gone


#: what a gang member's reply carries under ULFM when its collective met a dead rank (pydra._core.runner)
RAISED_IN_COLLECTIVE = WorkerLost("a rank in this unit's collective died")


def test_under_ulfm_a_dead_member_leaves_the_others_free_once_their_collective_raised() -> None:
    scheduler = make(collectives_raise=True)
    outcome = gang(scheduler, 2)
    uid = sends(scheduler.handle(Dispatch(0.0)))[1][-1][1]
    out = scheduler.handle(WorkerGone(1, "its process died", dead=True))
    assert isinstance(outcome["e"], WorkerLost)
    assert [i.rank for i in out if isinstance(i, Lost)] == [1] and TakeOver() not in out
    assert scheduler.stuck_ranks == []
    assert scheduler.workers[1].phase is Phase.GANG  # until it answers: MPI raised in its allreduce
    scheduler.handle(RepliesReceived(2, [failed(uid, RAISED_IN_COLLECTIVE, rank=2)], 0.1))
    assert scheduler.workers[1].phase is Phase.IDLE and outcome["e"] is not None


def test_under_ulfm_a_member_reporting_the_death_first_leaves_the_others_free_too() -> None:
    scheduler = make(collectives_raise=True)
    outcome = gang(scheduler, 2)
    uid = sends(scheduler.handle(Dispatch(0.0)))[1][-1][1]
    scheduler.handle(RepliesReceived(2, [failed(uid, RAISED_IN_COLLECTIVE, rank=2)], 0.1))
    assert isinstance(outcome["e"], WorkerLost) and scheduler.lost_ranks == [] and scheduler.stuck_ranks == []


def test_under_ulfm_a_member_lost_to_silence_still_takes_the_others_with_it() -> None:
    # Silence is no death MPI knows of: the others may wait in a collective with it for good.
    scheduler = make(collectives_raise=True, heartbeat_timeout=1.0)
    gang(scheduler, 2)
    scheduler.handle(Dispatch(0.0))
    scheduler.handle(Heard(2, 4.5))
    scheduler.handle(Tick(5.0))
    assert scheduler.lost_ranks == [1, 2] and scheduler.stuck_ranks == [2]


def test_a_worker_lost_to_silence_is_not_taken_for_stuck() -> None:
    scheduler = make(heartbeat_timeout=1.0)
    scheduler.handle(Tick(5.0))
    assert scheduler.lost_ranks == [1, 2] and scheduler.stuck_ranks == []


def test_a_gang_larger_than_the_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 3 worker ranks; this job has 2"):
        gang(make(), 3)


def test_a_failed_gang_is_given_up_and_the_stop_guards_against_stuck_members() -> None:
    scheduler = make()
    outcome = gang(scheduler, 2)
    uid = sends(scheduler.handle(Dispatch(0.0)))[1][-1][1]
    scheduler.handle(RepliesReceived(1, [failed(uid, RuntimeError("boom"))], 0.1))
    assert isinstance(outcome["e"], RuntimeError) and uid not in scheduler.pending
    scheduler.handle(StopRequested())
    out = scheduler.handle(Dispatch(0.2))
    guards = [i for i in out if isinstance(i, AbortIfStuck)]  # rank 2 may be blocked in the gang's collective
    assert [guard.reason for guard in guards] == [
        "pydra: a gang task failed (RuntimeError on rank 1, in a gang on ranks [1, 2]) and left ranks blocked in MPI;"
        " aborting the job\n"  # one line: the failure's traceback is its caller's to print, once
    ]
    assert ops(sends(out)[2]) == [protocol.STOP]


# -- cancel, drain, stop ------------------------------------------------------------------------------


def test_cancelled_units_are_announced_to_their_worker_and_their_replies_ignored() -> None:
    scheduler = make()
    calls = Calls(scheduler)
    calls.submit("a")
    sent = sends(scheduler.handle(Dispatch(0.0)))
    uid = sent[1][0][1]
    scheduler.cancel([uid])
    assert [i for i in scheduler.handle(Tick(0.1)) if isinstance(i, SendCancel)] == [SendCancel(1, [uid])]
    scheduler.handle(RepliesReceived(1, [ok(uid, "A")], 0.2))
    assert calls.results == {} and scheduler.workers[0].phase is Phase.IDLE


def test_a_drained_worker_finishes_its_units_takes_no_more_and_can_come_back() -> None:
    scheduler = make(depth=1)
    calls = Calls(scheduler)
    calls.submit("a")
    sent = sends(scheduler.handle(Dispatch(0.0)))
    scheduler.drain(1)
    assert scheduler.workers[0].phase is Phase.DRAINING
    calls.submit("b")
    assert list(sends(scheduler.handle(Dispatch(0.1)))) == [2]  # not to the draining rank 1
    scheduler.handle(RepliesReceived(1, [ok(sent[1][0][1], seconds=1.0)], 0.2))  # (long: the depth stays 1)
    assert scheduler.workers[0].phase is Phase.DRAINED and scheduler.alive_workers() == 1
    calls.submit("c")
    assert list(sends(scheduler.handle(Dispatch(0.3)))) == []  # rank 2 is full, rank 1 drained
    scheduler.undrain(1)
    assert scheduler.workers[0].phase is Phase.IDLE
    assert list(sends(scheduler.handle(Dispatch(0.4)))) == [1]


def test_the_stop_waits_for_the_queued_work_then_stops_every_worker() -> None:
    scheduler = make(depth=1)
    calls = Calls(scheduler)
    for name in "abc":
        calls.submit(name)
    scheduler.handle(StopRequested())
    sent = sends(scheduler.handle(Dispatch(0.0)))
    assert ops(sent[1]) == ops(sent[2]) == [protocol.CALL]  # work first
    scheduler.handle(RepliesReceived(1, [ok(sent[1][0][1])], 0.1))
    third = sends(scheduler.handle(Dispatch(0.1)))
    assert ops(third[1]) == [protocol.CALL] and not scheduler.stop_sent
    scheduler.handle(RepliesReceived(2, [ok(sent[2][0][1])], 0.2))
    scheduler.handle(RepliesReceived(1, [ok(third[1][0][1])], 0.2))
    stops = sends(scheduler.handle(Dispatch(0.2)))
    assert ops(stops[1]) == ops(stops[2]) == [protocol.STOP] and not scheduler.finished
    for rank in (1, 2):
        scheduler.handle(RepliesReceived(rank, [ok(stops[rank][0][1])], 0.3))
    assert scheduler.finished and sorted(calls.results) == ["a", "b", "c"]


# -- the phase table ----------------------------------------------------------------------------------


def test_every_phase_can_be_lost_and_no_other_move_leaves_lost() -> None:
    assert all(TRANSITIONS[(phase, Trigger.LOST)] is Phase.LOST for phase in Phase if phase is not Phase.LOST)
    assert not [key for key in TRANSITIONS if key[0] is Phase.LOST]


def test_a_move_not_in_the_table_is_a_bug_caught_at_once() -> None:
    scheduler = make()
    with pytest.raises(AssertionError, match="no move from idle on gang unit sent"):
        scheduler._move(scheduler.workers[0], Trigger.GANG)


def test_the_scheduler_imports_no_mpi() -> None:
    code = "import sys, pydra._core.scheduler; print('mpi4py.MPI' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
