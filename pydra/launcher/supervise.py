"""``python -m pydra.launcher.supervise PROGRAM...``: run one MPI rank so its death is survivable.

MPICH's launcher (Hydra) kills every rank of a job as soon as one of them
dies *by a signal*, whatever ``-disable-auto-cleanup`` says; a rank that
*exits* with a status is left to the others. So Pydra starts each rank under
this small supervisor: it runs the rank as its child and reports a worker
rank's death by a signal (SIGKILL, a segfault) as a message and a normal
exit, so rank 0 can reschedule that worker's units on the survivors. The
death of rank 0, the master, still ends the job with status 128 + signal.

It ignores Hydra's SIGUSR1 (sent to every rank when one dies) and passes
SIGINT and SIGTERM on to the rank. It imports nothing of Pydra or MPI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    child = subprocess.Popen(program, close_fds=False)  # the rank needs the launcher's fds (MPICH's PMI_FD)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    status = child.wait()
    if status >= 0:
        return status
    name = signal.Signals(-status).name
    rank = world_rank()
    print(f"pydra: rank {rank} (pid {child.pid}) was killed by {name}", file=sys.stderr, flush=True)
    if rank == 0:
        return 128 - status  # the master is gone: the job has failed
    return 0  # a worker: rank 0 carries on without it


def main() -> None:
    program = sys.argv[1:]
    if not program:
        print("usage: python -m pydra.launcher.supervise PROGRAM [ARG...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(supervise(program))


if __name__ == "__main__":
    main()
