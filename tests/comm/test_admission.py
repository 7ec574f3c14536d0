"""The admission policy of Pydra's listeners (pydra.comm.admission), in memory with a fake clock."""

from __future__ import annotations

import logging
import math

import pytest

from pydra import config
from pydra.comm.admission import Admission, Failure, Penalties, Policy, QuietLog, Refusal, Startups, source_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_startups_drops_at_random_from_start_rising_to_all_at_full() -> None:
    startups = Startups.parse("10:30:100")
    assert [startups.drop_chance(n) for n in (0, 9, 10, 55, 99, 100, 500)] == [0, 0, 0.3, 0.65, pytest.approx(0.9922, abs=1e-4), 1, 1]
    assert Startups.parse("4") == Startups(4, 100, 4)
    for bad in ("", "0", "10:30", "10:101:100", "20:30:10", "a:b:c"):
        with pytest.raises(ValueError):
            Startups.parse(bad)


def test_penalties_parse_like_sshd_and_no_turns_them_off() -> None:
    assert Penalties.parse("authfail:2 grace-exceeded:3 min:4") == Penalties(authfail=2, grace=3, min=4)
    assert Penalties.parse("no").min == float("inf")
    for bad in ("authfail", "crash:90", "noauth:-1", "max:inf"):
        with pytest.raises(ValueError):
            Penalties.parse(bad)


def test_settings_parse_and_refuse_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYDRA_MAX_STARTUPS", "5:50:20")
    monkeypatch.setenv("PYDRA_PER_SOURCE_PENALTIES", "noauth:2")
    assert config.setting("MAX_STARTUPS") == Startups(5, 50, 20)
    assert config.setting("PER_SOURCE_PENALTIES") == Penalties(noauth=2)
    monkeypatch.setenv("PYDRA_MAX_STARTUPS", "5:50")
    assert config.check_settings() == "PYDRA_MAX_STARTUPS='5:50': expected START:RATE:FULL or FULL (like sshd's MaxStartups)"


def test_one_source_gets_its_share_and_an_authenticated_connection_stops_counting() -> None:
    admission = Admission(Policy(per_source=2), chance=lambda: 1.0)
    assert [admission.admit("10.0.0.1") for _ in range(3)] == [None, None, Refusal.PER_SOURCE]
    assert admission.admit("10.0.0.2") is None and admission.pending == 3
    admission.authenticated("10.0.0.1")
    assert admission.pending == 2 and admission.admit("10.0.0.1") is None


def test_random_early_drop_uses_the_pending_count() -> None:
    rolls = iter([0.5, 0.5, 0.1])
    admission = Admission(Policy(startups=Startups(1, 20, 10), per_source=10), chance=lambda: next(rolls))
    assert admission.admit("a") is None  # 0 pending: never dropped
    assert admission.admit("b") is None  # 1 pending: dropped with 20 %, rolled 0.5
    assert admission.admit("c") is Refusal.STARTUPS  # 2 pending: ~29 %, rolled 0.1
    assert admission.pending == 2


def test_a_penalty_of_exactly_min_is_enforced_whatever_the_clock_reads() -> None:
    """Just below 2**16 s of uptime, (now + 15) - now came out a hair under 15, and a refusal that
    should have started a 15 s penalty started none (seen in CI): the penalty is summed as seconds."""
    clock = Clock()
    clock.now = math.nextafter(65530.0, math.inf)
    assert (clock.now + 15) - clock.now < 15  # the arithmetic that went wrong
    admission = Admission(Policy(penalties=Penalties(authfail=15, min=15)), clock)
    assert admission.admit("10.0.0.9") is None
    assert admission.failed("10.0.0.9", Failure.AUTHFAIL) == 15
    assert admission.admit("10.0.0.9") is Refusal.PENALISED


def test_penalties_add_up_are_enforced_from_min_and_run_out() -> None:
    clock = Clock()
    admission = Admission(Policy(penalties=Penalties(noauth=1, authfail=5, grace=10, min=15, max=40)), clock)
    for _ in range(2):  # a legitimate client failing now and then is never refused
        assert admission.admit("10.0.0.9") is None
        assert admission.failed("10.0.0.9", Failure.AUTHFAIL) is None
        clock.now += 10
    failures, started = 0, None
    while started is None:  # a flooder reaches min within a second: 1 s for each, a little decays
        assert admission.admit("10.0.0.9") is None
        started = admission.failed("10.0.0.9", Failure.NOAUTH)
        failures += 1
        clock.now += 0.01
    assert failures == 16 and 15 <= started < 16
    assert admission.admit("10.0.0.9") is Refusal.PENALISED and admission.admit("10.0.0.8") is None
    clock.now += started + 0.1
    assert admission.penalised("10.0.0.9") == 0 and admission.admit("10.0.0.9") is None  # served its time
    for _ in range(8):
        admission.failed("10.0.0.9", Failure.GRACE)
    assert admission.penalised("10.0.0.9") == pytest.approx(40)  # capped at max


def test_sources_are_addresses_and_ipv6_slash_64s() -> None:
    assert source_of("127.0.0.66") == "127.0.0.66"
    assert source_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"


def test_quiet_log_says_a_few_lines_of_each_kind_then_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    quiet = QuietLog(logging.getLogger("test.quiet"), interval=10, burst=2, clock=clock)
    with caplog.at_level(logging.INFO, "test.quiet"):
        for n in range(1000):
            quiet.note(logging.INFO, "refused", "refused %d", n)
        quiet.note(logging.WARNING, "penalty", "penalised")  # a kind of its own still gets its lines
        assert quiet.flush_due == 1010
        clock.now += 10
        quiet.tick()
        assert quiet.flush_due is None
        quiet.note(logging.INFO, "refused", "refused again")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused 1", "penalised", "suppressed 998 lines in the last 10 s: 998 refused", "refused again",
    ]
