"""Settings read from ``PYDRA_*`` environment variables, all in one table.

Every setting Pydra honours is listed in :data:`SETTINGS` with its default,
how its text is read and what it means (the README lists the same), and is
read through :func:`setting`. :func:`check_settings` reads them all at once,
so that ``pydra`` refuses a bad value in one line before any MPI starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def flag(text: str) -> bool:
    """Parse an on/off setting: 1/yes/true/on or 0/no/false/off."""
    if text.lower() in ("1", "yes", "true", "on"):
        return True
    if text.lower() in ("0", "no", "false", "off"):
        return False
    raise ValueError(text)


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0 or value != value or value == float("inf"):  # also refuses nan and inf
            raise ValueError(text)
        return value

    return parse


def _not_negative(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not 0 <= value < float("inf"):  # also refuses nan
            raise ValueError(text)
        return value

    return parse


def _listener_defence(kind: str) -> Callable[[str], Any]:
    """Parse a listener's flood defence with :mod:`pydra.comm.admission`'s *kind*, imported only then.

    Only ``pydra node`` and ``pydra serve`` listen; every other process
    (each rank of a job, the launcher) would pay ~10 ms to import it.
    """

    def parse(text: str) -> Any:
        from pydra.comm import admission

        return getattr(admission, kind).parse(text)

    return parse


class Unusable(ValueError):
    """A value that reads but cannot be used, saying why (a parser's; :func:`setting` keeps the reason)."""


def _serializer(text: str) -> str:
    """A module that can pickle for every rank (:func:`pydra.comm.serial.serializer_module`), imported only then."""
    if text != "pickle":
        from pydra.comm import serial

        try:
            serial.serializer_module(text)
        except ValueError as exc:
            raise Unusable(str(exc)) from None
    return text


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text

    return parse


def _threads(text: str) -> str | int:
    """``PYDRA_THREADS``, read by :mod:`pydra.cpus`, imported only then."""
    from pydra import cpus

    return cpus.parse_threads(text)


@dataclass(frozen=True)
class Setting:
    """One ``PYDRA_<name>``: its default, how its text is read, what a value must be, and what it does.

    A default written as text (not empty) is read by *parse* as the
    environment's value would be.
    """

    default: Any
    parse: Callable[[str], Any]
    expected: str
    meaning: str


_POSITIVE_INT, _POSITIVE_FLOAT = _positive(int), _positive(float)

#: name (without the PYDRA_ prefix) -> the setting; the README's table lists the same.
SETTINGS: dict[str, Setting] = {
    "PIPELINE": Setting(2, _POSITIVE_INT, "a positive integer", "fewest units in flight per worker"),
    "PIPELINE_SECONDS": Setting(0.002, _POSITIVE_FLOAT, "a positive number of seconds",
                                "worker time to keep queued at each worker, for tiny units"),
    "BATCH_SECONDS": Setting(0.02, _POSITIVE_FLOAT, "a positive number of seconds",
                             "target worker time of one adaptive batch"),
    "MAX_BATCH": Setting(16384, _POSITIVE_INT, "a positive integer", "largest adaptive batch, in items"),
    "IDLE_SLEEP": Setting(0.005, _POSITIVE_FLOAT, "a positive number of seconds",
                          "longest sleep between polls of an idle rank"),
    "SPIN_SECONDS": Setting(0.0005, _not_negative(float), "0 or more seconds",
                            "how long a rank polls without sleeping after activity"),
    "SHM_BYTES": Setting(32 << 20, _not_negative(int), "0 or more bytes",
                         "each rank's shared memory for large buffers to ranks of its host, taken as used"
                         " (0: none, every buffer goes by MPI; pydra.comm.shm)"),
    "HEARTBEAT": Setting(0.5, _POSITIVE_FLOAT, "a positive number of seconds",
                         "seconds between two heartbeats of a worker rank"),
    "HEARTBEAT_TIMEOUT": Setting(10.0, _POSITIVE_FLOAT, "a positive number of seconds",
                                 "seconds of silence after which rank 0 declares a worker lost"),
    "STOP_GRACE": Setting(30.0, _POSITIVE_FLOAT, "a positive number of seconds",
                          "seconds a rank told to stop (Ctrl-C, a batch system's SIGTERM) has to end before its "
                          "supervisor kills it; pydra run -n and pydra launch stop mpiexec hard 15 s after that"),
    "ISOLATE": Setting(False, flag, "1 or 0 (yes/no, true/false, on/off)",
                       "run task code in a child process of each worker rank"),
    "THREADS": Setting("auto", _threads, "auto, off or a positive integer",
                       "threads each rank's numerical libraries (OpenBLAS, MKL, OpenMP...) may start: auto shares "
                       "the rank's cores among the workers on them; off leaves them alone (pydra.cpus)"),
    "IMPORT_TIMEOUT": Setting(20.0, _POSITIVE_FLOAT, "a positive number of seconds",
                              "longest a service lets a job's TARGET take to import, in a child process first"),
    "MAX_RESULT_BYTES": Setting(1 << 30, _POSITIVE_INT, "a positive number of bytes",
                                "largest pickled result a worker sends back for one unit"),
    "PROGRESS": Setting("", _one_of("bar", "lines", "off"), "bar, lines or off",
                        "how pydra run shows a long job's progress (default: bar on a terminal, else lines)"),
    "MPIEXEC": Setting("", str, "a command", "the mpiexec that `pydra run -n` uses (default: mpi4py's MPI's)"),
    "HOME": Setting("~/.pydra", str, "a directory", "Pydra's directory for keys and runs"),
    "AGENTS": Setting("{}", str, "JSON", "set by pydra launch for pydra-remote-exec: {name: [host, agent port, user]}"),
    "IDENTITY": Setting("", str, "a key file or public key line",
                        "set by pydra launch for pydra-remote-exec: the launcher's public key"),
    "IDENTITY_AGENT": Setting("", str, "a socket path",
                              "set by pydra launch for pydra-remote-exec: the ssh-agent socket that signs as that key"),
    "KNOWN_HOSTS": Setting("", str, "a file", "set by pydra launch for pydra-remote-exec: the pinned host keys"),
    "CONNECTOR": Setting("", str, "a socket path",
                         "set by pydra launch for pydra-remote-exec: the Unix socket that reaches the agents"),
    "IFACE": Setting("", str, "an interface name",
                     "the network interface MPI's own connections between hosts use (pydra launch --iface)"),
    "JOB_KEY": Setting("", str, "64 hex digits",
                       "the job's key, with which every rank seals Pydra's messages (set by pydra launch)"),
    "SERIALIZER": Setting("pickle", _serializer, "pickle, cloudpickle, dill or a module with dumps and loads",
                          "how every rank pickles calls, arguments and results"),
    "STARTUP_FD": Setting("", str, "a file descriptor number",
                          "set by each rank's supervisor (pydra.launcher.supervise): "
                          "the pipe on which the rank tells it its start-up steps"),
    "STARTED_NOTICE": Setting("", str, "a socket name", "set by pydra run -n for rank 0's supervisor: where it "
                              "says rank 0 has started (an mpiexec that exits 0 having started none is an error)"),
    "DEATH_NOTICES": Setting("", str, "a socket name", "set by pydra.launcher.supervise for its rank: "
                             "where the supervisors on this host report a worker's death"),
    "RESUME_WITH": Setting("", str, "a command line", "set by pydra run -n, pydra launch and the batch scripts "
                           "for rank 0: the command that resumes the job, less --resume DIR"),
    "SEAL": Setting(False, flag, "1 or 0",
                    "1: seal a single-host `pydra run -n N` with a fresh key; on ranks, demand a PYDRA_JOB_KEY"),
    # The defences of pydra node's and pydra serve's listeners against floods (docs/SECURITY.md).
    "MAX_STARTUPS": Setting("10:30:100", _listener_defence("Startups"), "START:RATE:FULL or FULL (like sshd's MaxStartups)",
                            "unauthenticated connections at which a listener starts dropping new ones (10:30:100)"),
    "PER_SOURCE_MAX_STARTUPS": Setting(8, _POSITIVE_INT, "a positive integer",
                                       "unauthenticated connections a listener allows from one address (IPv6: one /64)"),
    "PER_SOURCE_PENALTIES": Setting("authfail:5 noauth:1 grace-exceeded:10 min:15 max:600",
                                    _listener_defence("Penalties"),
                                    "NAME:SECONDS ... (authfail, noauth, grace-exceeded, min, max) or no",
                                    "how long a listener refuses an address whose handshakes fail "
                                    "(authfail:5 noauth:1 grace-exceeded:10 min:15 max:600)"),
    "LOGIN_GRACE_TIME": Setting(5.0, _POSITIVE_FLOAT, "a positive number of seconds",
                                "seconds a client has to complete its handshake with a listener "
                                "(and, on pydra node --system, to send its request)"),
}


def setting(name: str, default: Any = None, parse: Callable[[str], Any] | None = None) -> Any:
    """``PYDRA_<name>`` read as :data:`SETTINGS` says (an unset or empty variable: its default).

    *default* and *parse*, if given, override the table's (a caller with a
    default of its own, a path computed at run time, say). A value that does
    not parse is the user's mistake: ``ValueError`` naming the variable, the
    value and what is expected.
    """
    entry = SETTINGS.get(name)
    if entry is None:
        raise KeyError(f"unknown setting PYDRA_{name}")
    raw = os.environ.get(f"PYDRA_{name}", "")
    if not raw:
        if default is not None:
            return default
        if not (isinstance(entry.default, str) and entry.default):
            return entry.default
        raw = entry.default
    try:
        return (parse or entry.parse)(raw)
    except Unusable as exc:
        raise ValueError(f"PYDRA_{name}={raw!r}: {exc}") from None
    except ValueError:
        raise ValueError(f"PYDRA_{name}={raw!r}: expected {entry.expected}") from None


def check_settings() -> str | None:
    """The first ``PYDRA_*`` variable that is set but unusable, as one line; None if all are fine.

    An unknown ``PYDRA_`` name is a typo that would otherwise be ignored. Settings that must
    agree are checked together too.
    """
    for variable in sorted(os.environ):
        if not variable.startswith("PYDRA_"):
            continue
        name = variable[len("PYDRA_"):]
        if name not in SETTINGS:
            import difflib  # only for a typo: every rank reads this module at start

            close = difflib.get_close_matches(name, SETTINGS, n=1)
            if close:
                return f"{variable}: no such setting; did you mean PYDRA_{close[0]}?"
            return f"{variable}: no such setting (known: {', '.join('PYDRA_' + known for known in SETTINGS)})"
        try:
            setting(name)
        except ValueError as exc:
            return str(exc)
    beat, timeout = setting("HEARTBEAT"), setting("HEARTBEAT_TIMEOUT")
    if timeout <= 2 * beat:  # one late heartbeat, on a busy machine, would lose a working rank
        return (f"PYDRA_HEARTBEAT_TIMEOUT={timeout:g} must be more than twice PYDRA_HEARTBEAT={beat:g}:"
                " rank 0 would declare workers lost between two of their heartbeats")
    return None


def pydra_home() -> Path:
    """Return Pydra's directory for keys and runs: ``$PYDRA_HOME``, or ``~/.pydra``."""
    return Path(setting("HOME")).expanduser()
