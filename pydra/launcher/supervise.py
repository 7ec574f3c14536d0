"""``python -m pydra.launcher.supervise PROGRAM...``: run one MPI rank so its death is survivable.

MPICH's launcher (Hydra) kills every rank of a job as soon as one of them
dies *by a signal*, whatever ``-disable-auto-cleanup`` says; a rank that
*exits* with a status is left to the others. So Pydra starts each rank under
this small supervisor: it runs the rank as its child and reports a worker
rank's death by a signal (SIGKILL, a segfault) as a message and a normal
exit, so rank 0 can reschedule that worker's units on the survivors. The
death of rank 0, the master, still ends the job with status 128 + signal.

A rank lost during start-up is different: until it has joined the session
the others wait for it inside MPI's start-up or a collective, and nothing
would ever tell them it is gone. The rank reports each start-up step on a
pipe (``PYDRA_STARTUP_FD``, see :mod:`pydra.startup`); if it dies before
``joined``, the supervisor prints which rank was lost and in which step, and
kills itself with SIGKILL, so that Hydra ends the whole job.

It ignores Hydra's SIGUSR1 (sent to every rank when one dies) and passes
SIGINT and SIGTERM on to the rank. It imports nothing of Pydra or MPI:
``pydra run -n`` starts it as ``python -I -S .../supervise.py``, without
site-packages, because that is three times quicker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

#: what a rank reports once its start-up is over (pydra.startup.JOINED)
JOINED = "joined"
#: environment variables holding a process's rank in the job, per MPI launcher (Slurm's last:
#: under an mpiexec in a Slurm job it numbers mpiexec's proxies, not the ranks)
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def world_rank() -> int | None:
    """This process's rank in the MPI job, as its launcher says, or None if not under one."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def supervise(program: list[str]) -> int:
    """Run *program* as a child and return the status this process should exit with."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    steps, report = os.pipe()  # the rank writes its start-up steps to *report* (pydra.startup)
    os.set_inheritable(report, True)
    env = dict(os.environ, PYDRA_STARTUP_FD=str(report))
    # close_fds=False: the rank needs the launcher's fds (MPICH's PMI_FD), and *report*.
    child = subprocess.Popen(program, close_fds=False, env=env)
    os.close(report)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    status = child.wait()
    if status >= 0:
        return status
    name = signal.Signals(-status).name
    rank = world_rank()
    step = _last_step(steps)
    if step != JOINED:
        # The other ranks wait for this one inside MPI's start-up or a collective, and would
        # wait forever: end the job. Hydra stops every rank once one has died by a signal.
        where = step or "before it had started MPI"
        print(f"pydra: rank {rank} (pid {child.pid}) was killed by {name} during start-up, {where}; ending the job",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    print(f"pydra: rank {rank} (pid {child.pid}) was killed by {name}", file=sys.stderr, flush=True)
    if rank == 0:
        return 128 - status  # the master is gone: the job has failed
    return 0  # a worker: rank 0 carries on without it


def _last_step(steps: int) -> str:
    """The last start-up step the rank reported on the pipe *steps* ('' for none)."""
    os.set_blocking(steps, False)  # a process the rank started may hold the write end open still
    data = b""
    try:
        while chunk := os.read(steps, 4096):
            data += chunk
    except BlockingIOError:
        pass
    lines = data.decode(errors="replace").splitlines()
    return lines[-1] if lines else ""


def main() -> None:
    program = sys.argv[1:]
    if not program:
        print("usage: python -m pydra.launcher.supervise PROGRAM [ARG...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(supervise(program))


if __name__ == "__main__":
    main()
