"""TARGET for tests/core/test_startup_losses.py: one rank of the job is lost at a chosen start-up step.

The step comes from ``FAULT_STEP`` and the rank from ``FAULT_RANK`` (rank
``start`` is handled by startup_hook/sitecustomize.py, before MPI starts):

* ``ship``: rank 0, loading this module before it ships it, kills rank
  FAULT_RANK (which waits for the TARGET) by pid;
* ``load``: rank FAULT_RANK dies while it loads this module;
* a collective's label (``gather-problems``, ``bcast-failures``,
  ``gather-hosts``): rank FAULT_RANK dies as it enters that collective.

Everything here is test code: it patches pydra.startup.reached in this process only.
"""

import os
import signal

import pydra
from pydra import startup

STEP, RANK = os.environ.get("FAULT_STEP", ""), os.environ.get("FAULT_RANK", "")
#: this process's rank, as MPICH's or Open MPI's launcher says
HERE = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))


def die() -> None:
    """SIGKILL, or with ``FAULT_HOW=exit`` an exit with status 3 that skips everything (as a crashing C library)."""
    if os.environ.get("FAULT_HOW") == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def rank_pid(rank: str) -> int:
    """The pid of this job's rank *rank* (a ``python -m pydra run`` whose environment says so)."""
    tag = f"FAULT_TAG={os.environ['FAULT_TAG']}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        ranked = {f"{name}={rank}".encode() for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")}
        if tag in environ and ranked & set(environ) and argv[1:3] == [b"-m", b"pydra"]:
            return int(entry)
    raise RuntimeError(f"no rank {rank} found")


if STEP == "ship" and HERE == "0":
    os.kill(rank_pid(RANK), signal.SIGKILL)
elif STEP == "load" and HERE == RANK:
    die()
elif HERE == RANK and STEP:
    reached = startup.reached

    def reached_then_die(label: str) -> None:
        reached(label)  # the supervisor hears of the step first, as from a rank lost inside it
        if label == STEP:
            die()

    startup.reached = reached_then_die


def identity(x):
    return x


def Tiny():
    return pydra.Parallel(identity)
