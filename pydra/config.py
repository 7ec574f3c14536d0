"""Settings read from ``PYDRA_*`` environment variables.

Every environment setting Pydra honours is read through :func:`setting`, so the
full list lives in one place (see ``SETTINGS`` below and the README).
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

T = TypeVar("T")

#: name (without the PYDRA_ prefix) -> what it does; the README lists the same.
SETTINGS = {
    "PIPELINE": "fewest units in flight per worker (default 2)",
    "PIPELINE_SECONDS": "worker time to keep queued at each worker, for tiny units (default 0.002)",
    "BATCH_SECONDS": "target worker time of one adaptive batch (default 0.02)",
    "MAX_BATCH": "largest adaptive batch, in items (default 16384)",
    "IDLE_SLEEP": "longest sleep between polls of an idle rank, in seconds (default 0.005)",
    "SPIN_SECONDS": "how long a rank polls without sleeping after activity (default 0.0005)",
    "HEARTBEAT": "seconds between two heartbeats of a worker rank (default 0.5)",
    "HEARTBEAT_TIMEOUT": "seconds of silence after which rank 0 declares a worker lost (default 10)",
    "ISOLATE": "1 to run task code in a child process of each worker rank (default 0)",
    "MAX_RESULT_BYTES": "largest pickled result a worker sends back for one unit (default 1073741824)",
    "PROGRESS": "bar, lines or off: how pydra run shows a long job's progress (default: bar on a terminal)",
    "MPIEXEC": "the mpiexec that `pydra run -n` uses (default: the one of mpi4py's MPI)",
    "HOME": "Pydra's directory for keys and runs (default ~/.pydra)",
    "AGENTS": "set by pydra launch for pydra-remote-exec: JSON {name in the machinefile: [host, agent port]}",
    "IDENTITY": "set by pydra launch for pydra-remote-exec: the launcher's private key",
    "KNOWN_HOSTS": "set by pydra launch for pydra-remote-exec: the pinned host keys",
    "CONNECTOR": "set by pydra launch for pydra-remote-exec: the Unix socket that reaches the agents",
    "IFACE": "the network interface MPI's own connections between hosts use (pydra launch --iface)",
    "JOB_KEY": "64 hex digits: the job's key, with which every rank seals Pydra's messages (set by pydra launch)",
    "SERIALIZER": "pickle, cloudpickle or dill (or any module with dumps/loads): how every rank pickles calls,"
                  " arguments and results; cloudpickle sends lambdas and closures (default pickle)",
    "SEAL": "1 to seal a single-host `pydra run -n N` with a fresh key; on ranks, 1 demands a PYDRA_JOB_KEY (default 0)",
}


def setting(name: str, default: T, parse: Callable[[str], T] | None = None) -> T:
    """Return ``PYDRA_<name>`` parsed with *parse* (the type of *default* if omitted).

    An unset or empty variable gives *default*; a value that does not parse is
    the user's mistake and raises ``ValueError`` naming the variable.
    """
    if name not in SETTINGS:
        raise KeyError(f"unknown setting PYDRA_{name}")
    raw = os.environ.get(f"PYDRA_{name}", "")
    if not raw:
        return default
    parse = parse or type(default)
    try:
        return parse(raw)
    except ValueError:
        kind = getattr(parse, "__name__", "value")
        raise ValueError(f"PYDRA_{name}={raw!r}: expected {kind}") from None


def flag(text: str) -> bool:
    """Parse an on/off setting: 1/yes/true/on or 0/no/false/off."""
    if text.lower() in ("1", "yes", "true", "on"):
        return True
    if text.lower() in ("0", "no", "false", "off"):
        return False
    raise ValueError(text)
