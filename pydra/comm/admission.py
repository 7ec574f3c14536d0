"""Who may start a handshake, decided before any byte is read or any crypto done (sans-IO).

What OpenSSH's sshd does against connection floods, for Pydra's listeners (the node agent and the
admin endpoint):

- **MaxStartups** ``start:rate:full``: below *start* unauthenticated connections every new one is
  admitted; from *start* on a new one is dropped with probability *rate* %, rising linearly to
  100 % at *full* (random early drop).  An authenticated connection no longer counts.
- **PerSourceMaxStartups**: at most this many unauthenticated connections from one source
  (an IPv4 address, an IPv6 /64), so one host cannot take every startup.
- **PerSourcePenalties**: a source whose handshake fails earns a penalty (``authfail`` for a key
  that is refused, ``noauth`` for hanging up before authenticating, ``grace-exceeded`` for not
  finishing within the grace time); penalties add up, to at most ``max`` seconds, and once they
  reach ``min`` every connection from that source is refused until they have run out.  A
  legitimate client that fails now and then never reaches ``min``; a flooder does within a second.
- **LoginGraceTime**: the deadline of a handshake (kept in :class:`Policy`, enforced by the
  listener).

A listener calls :meth:`Admission.admit` for each accepted TCP connection and closes it at once
if that returns a :class:`Refusal`; otherwise it reports the end of the handshake with
:meth:`Admission.authenticated` or :meth:`Admission.failed`.  :class:`QuietLog` keeps refusals
from flooding the log: a few lines per interval, then one line counting what it suppressed.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Admission", "Failure", "Penalties", "Policy", "QuietLog", "Refusal", "Startups", "source_of"]

_MAX_SOURCES = 65536  # penalised sources remembered at once (sshd's max-sources); beyond: no new penalties


@dataclass(frozen=True)
class Startups:
    """MaxStartups ``start:rate:full``: random early drop of new unauthenticated connections."""

    start: int = 10
    rate: int = 30
    full: int = 100

    @classmethod
    def parse(cls, text: str) -> Startups:
        """``START:RATE:FULL`` or just ``FULL`` (then every connection beyond FULL is refused)."""
        parts = text.split(":")
        if len(parts) == 1:
            full = int(parts[0])
            startups = cls(full, 100, full)
        elif len(parts) == 3:
            startups = cls(*(int(part) for part in parts))
        else:
            raise ValueError(text)
        if not (1 <= startups.start <= startups.full and 0 <= startups.rate <= 100):
            raise ValueError(text)
        return startups

    def drop_chance(self, pending: int) -> float:
        """The probability (0 to 1) of dropping a new connection when *pending* are unauthenticated."""
        if pending < self.start:
            return 0.0
        if pending >= self.full:
            return 1.0
        return (self.rate + (100 - self.rate) * (pending - self.start) / (self.full - self.start)) / 100


class Failure(enum.Enum):
    """How an admitted handshake failed: each earns its source a penalty."""

    AUTHFAIL = "authfail"  #: the client's key was refused
    NOAUTH = "noauth"  #: the client hung up or broke the protocol before authenticating
    GRACE = "grace-exceeded"  #: the client did not finish within the grace time


@dataclass(frozen=True)
class Penalties:
    """PerSourcePenalties, in seconds: what each failure adds, and when penalties are enforced."""

    authfail: float = 5.0
    noauth: float = 1.0
    grace: float = 10.0
    min: float = 15.0
    max: float = 600.0

    _NAMES = {"authfail": "authfail", "noauth": "noauth", "grace-exceeded": "grace", "min": "min", "max": "max"}

    @classmethod
    def parse(cls, text: str) -> Penalties:
        """``NAME:SECONDS ...`` (authfail, noauth, grace-exceeded, min, max); unnamed ones keep their default.

        ``no`` turns penalties off (a ``min`` nothing can reach).
        """
        if text.strip() == "no":
            return cls(min=float("inf"))
        values = {}
        for item in text.split():
            name, _, seconds = item.partition(":")
            value = float(seconds)
            if name not in cls._NAMES or not 0 <= value < float("inf"):
                raise ValueError(text)
            values[cls._NAMES[name]] = value
        return cls(**values)

    def of(self, failure: Failure) -> float:
        """The seconds one *failure* adds."""
        return {Failure.AUTHFAIL: self.authfail, Failure.NOAUTH: self.noauth, Failure.GRACE: self.grace}[failure]


@dataclass(frozen=True)
class Policy:
    """Everything a listener needs to defend its handshakes."""

    startups: Startups = field(default_factory=Startups)
    per_source: int = 8
    penalties: Penalties = field(default_factory=Penalties)
    grace: float = 5.0


class Refusal(enum.Enum):
    """Why a new connection was closed before its handshake."""

    PENALISED = "source penalised"
    PER_SOURCE = "per-source startups exceeded"
    STARTUPS = "max startups (random early drop)"


def source_of(address: str) -> str:
    """The source a connection from *address* counts against: the address itself, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address  # not an IP (a Unix socket, say): itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Admission:
    """The startups and penalties of one listener; every method is O(1) and does no I/O."""

    def __init__(
        self,
        policy: Policy,
        clock: Callable[[], float] = time.monotonic,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.pending = 0  #: unauthenticated connections now
        self._clock = clock
        self._chance = chance
        self._pending_from: Counter[str] = Counter()
        self._until: dict[str, float] = {}  # source -> when its accrued penalty runs out
        self._enforced: set[str] = set()  # sources refused until then

    def admit(self, source: str) -> Refusal | None:
        """None to admit a connection from *source* (it then counts as pending), else why not."""
        if source in self._enforced:
            if self._clock() < self._until[source]:
                return Refusal.PENALISED
            self._enforced.discard(source)
            del self._until[source]
        if self._pending_from[source] >= self.policy.per_source:
            return Refusal.PER_SOURCE
        if self._chance() < self.policy.startups.drop_chance(self.pending):
            return Refusal.STARTUPS
        self.pending += 1
        self._pending_from[source] += 1
        return None

    def authenticated(self, source: str) -> None:
        """An admitted connection from *source* authenticated: it is pending no more."""
        self._release(source)

    def release(self, source: str) -> None:
        """An admitted connection from *source* ended through no fault of its own (the server closing)."""
        self._release(source)

    def failed(self, source: str, failure: Failure) -> float | None:
        """An admitted handshake from *source* failed; the seconds it is now refused for, if this started that."""
        self._release(source)
        now = self._clock()
        if source not in self._until and len(self._until) >= _MAX_SOURCES:
            self._forget_expired(now)
            if len(self._until) >= _MAX_SOURCES:
                return None  # like sshd's permissive overflow: no new source is penalised
        penalties = self.policy.penalties
        # The penalty still to run, in seconds, summed as such: (now + 15) - now may come out below 15.
        accrued = min(max(self._until.get(source, now) - now, 0.0) + penalties.of(failure), penalties.max)
        self._until[source] = now + accrued
        if source not in self._enforced and accrued >= penalties.min:
            self._enforced.add(source)
            return accrued
        return None

    def penalised(self, source: str) -> float:
        """Seconds *source* is still refused for (0 if it is not)."""
        if source not in self._enforced:
            return 0.0
        return max(0.0, self._until[source] - self._clock())

    def _release(self, source: str) -> None:
        self.pending -= 1
        self._pending_from[source] -= 1
        if self._pending_from[source] <= 0:
            del self._pending_from[source]

    def _forget_expired(self, now: float) -> None:
        for source in [s for s, until in self._until.items() if until <= now]:
            del self._until[source]
            self._enforced.discard(source)


class QuietLog:
    """A log that says at most *burst* lines of each kind per *interval* seconds and counts the rest.

    Once an interval is over, :meth:`tick` (or the next line) reports what was suppressed, by
    kind: ``suppressed 1234 lines in the last 10 s: 1200 source penalised, 34 handshake failed``.
    A listener calls :meth:`tick` at :attr:`flush_due`, so the count is told even when the flood
    stops.
    """

    def __init__(
        self, log: logging.Logger, interval: float = 10.0, burst: int = 5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log = log
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._window_start = clock()
        self._said: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    @property
    def flush_due(self) -> float | None:
        """When (on the clock) there will be a count of suppressed lines to report, or None."""
        return self._window_start + self.interval if self._suppressed else None

    def note(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log *message* % *args* at *level*, unless this interval's lines of *kind* are used up: then count it."""
        self.tick()
        if self._said[kind] < self.burst:
            self._said[kind] += 1
            self.log.log(level, message, *args)
        else:
            self._suppressed[kind] += 1

    def tick(self) -> None:
        """If the interval is over: report what was suppressed (if anything) and start a new one."""
        if self._clock() >= self._window_start + self.interval:
            self.flush()

    def flush(self) -> None:
        """Report what was suppressed (if anything) now, and start a new interval."""
        now = self._clock()
        if self._suppressed:
            kinds = ", ".join(f"{count} {kind}" for kind, count in self._suppressed.most_common())
            self.log.warning(
                "suppressed %d lines in the last %.0f s: %s", sum(self._suppressed.values()),
                now - self._window_start, kinds,
            )
            self._suppressed.clear()
        self._window_start = now
        self._said.clear()
