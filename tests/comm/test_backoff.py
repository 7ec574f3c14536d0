"""pydra.comm.backoff: the pacing of polling loops, on a fake clock."""

from __future__ import annotations

import types

import pytest

from pydra.comm import backoff as pacing
from pydra.comm.backoff import Backoff

SPIN, LONGEST = 0.0005, 0.005


class FakeClock:
    """Stands in for the module's ``time`` and ``os``: polls cost 10 µs, sleeps last exactly what they ask."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.yields = 0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def sched_yield(self) -> None:
        self.yields += 1
        self.now += 1e-5


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pacing, "time", fake)
    monkeypatch.setattr(pacing, "os", types.SimpleNamespace(sched_yield=fake.sched_yield))
    monkeypatch.setenv("PYDRA_SPIN_SECONDS", str(SPIN))
    return fake


def poll_until(backoff: Backoff, clock: FakeClock, arrival: float) -> float:
    """Poll (one poll = one sleep call) until a message that lands *arrival* seconds in is seen; how late it is."""
    start = clock.now
    while clock.now - start < arrival:
        backoff.sleep()
    return clock.now - start - arrival


def test_a_rank_spins_right_after_activity_and_sleeps_after(clock: FakeClock) -> None:
    backoff = Backoff(LONGEST)
    poll_until(backoff, clock, SPIN / 2)
    assert clock.sleeps == [] and clock.yields > 0
    poll_until(backoff, clock, 0.1)
    assert clock.sleeps and max(clock.sleeps) == LONGEST  # idle: a wake-up every PYDRA_IDLE_SLEEP
    clock.sleeps.clear()
    backoff.reset()
    poll_until(backoff, clock, SPIN / 2)
    assert clock.sleeps == []


@pytest.mark.parametrize("arrival", [0.0007, 0.002, 0.004, 0.016, 0.04, 0.3])
def test_a_message_is_seen_at_most_a_tenth_of_the_wait_late(clock: FakeClock, arrival: float) -> None:
    late = poll_until(Backoff(LONGEST), clock, arrival)
    assert late <= max(Backoff.FIRST_SLEEP, Backoff.LATE * arrival, 1e-5) + 1e-9
    assert late <= LONGEST


def test_an_idle_rank_wakes_rarely(clock: FakeClock) -> None:
    """A second of quiet costs few wake-ups: the sleeps grow with the quiet time to PYDRA_IDLE_SLEEP."""
    poll_until(Backoff(LONGEST), clock, 1.0)
    assert len(clock.sleeps) < 1.0 / LONGEST + 60
