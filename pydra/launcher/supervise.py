"""``python -m pydra.launcher.supervise PROGRAM...``: run one MPI rank so its death is survivable.

MPICH's launcher (Hydra) kills every rank of a job as soon as one of them
dies *by a signal*, whatever ``-disable-auto-cleanup`` says; a rank that
*exits* with a status is left to the others. So Pydra starts each rank under
this small supervisor: it runs the rank as its child and reports a worker
rank's death by a signal (SIGKILL, a segfault) as a message and a normal
exit, so rank 0 can reschedule that worker's units on the survivors. A
worker that exits with a status in the middle of a session (a task's
``os._exit(9)``) is lost the same way, and its supervisor exits with 0: the
job's status is rank 0's, so a job that recovered ends with 0. Once the
rank says its session is over (``left``, :func:`pydra.startup.left`), its
status is its program's own again. The
death of rank 0, the master, still ends the job with status 128 + signal.
Under Open MPI's ULFM, which reports a rank's death to the others only when
its launcher sees a death, the supervisor ends as its rank did, by the same
signal, and says nothing; a worker that exits with a status in its session
it ends by SIGKILL, which ULFM reports at once (and prterun does not make the
job's status).

A worker's unexpected end is also told to rank 0 at once when rank 0 runs on
the same host: the supervisors of one job on one host share a parent (the
launcher's proxy), which names a Unix datagram socket that rank 0 listens on
(:class:`DeathNotices`); rank 0 then reschedules that worker's units without
waiting for ``PYDRA_HEARTBEAT_TIMEOUT``. A worker on another host is
declared lost when its heartbeats stop.

A rank lost during start-up is different: until it has joined the session
the others wait for it inside MPI's start-up or a collective, and nothing
would ever tell them it is gone. The rank reports each start-up step on a
pipe (``PYDRA_STARTUP_FD``, see :mod:`pydra.startup`); if it dies before
``joined``, the supervisor prints which rank was lost and in which step, and
ends the whole job: it kills itself with SIGKILL, which makes Hydra (or Open
MPI without ULFM) stop every rank (a forked witness keeps its pipes open
until it is dead, so that Hydra hears of the death only once it can see
it). Under Open MPI's ULFM a death ends nothing, and a rank lost before
MPI's start-up leaves the others waiting in MPI_Init forever, so the
supervisor first sends SIGTERM to its parent, Open MPI's launcher on this
host (``prterun``, or a ``prted`` daemon), which then stops every rank of
the job.

It ignores Hydra's SIGUSR1 (sent to every rank when one ends) and passes
SIGINT, SIGTERM, SIGHUP and SIGUSR2 (Open MPI's relayed stop) on to the
rank: a rank stopped that way ends without a word (the job is being
stopped), and one that has not ended ``PYDRA_STOP_GRACE`` seconds later
(:func:`stop_grace`) is killed. It imports nothing of Pydra or MPI:
``pydra run -n`` starts it as ``python -I -S .../supervise.py``, without
site-packages, because that is three times quicker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

#: what a rank reports once its start-up is over and it is in a session (pydra.startup.joined)
JOINED = "joined"
#: what a rank reports once its session is over, or it ends on purpose: its exit status is its own (pydra.startup.left)
LEFT = "left"
#: environment variables holding a process's rank in the job, per MPI launcher (Slurm's last:
#: under an mpiexec in a Slurm job it numbers mpiexec's proxies, not the ranks)
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

#: the variable that tells a supervised rank where its job's death notices go on this host
NOTICES_VARIABLE = "PYDRA_DEATH_NOTICES"
#: the variable that tells rank 0's supervisor where to say that rank 0 has started (set by pydra run -n)
STARTED_VARIABLE = "PYDRA_STARTED_NOTICE"

#: Open MPI's launcher processes: the parent of every rank on a host (prterun on its own host, prted elsewhere)
_OPEN_MPI_LAUNCHERS = ("prterun", "prted")

#: seconds a rank told to stop has before it is killed, unless PYDRA_STOP_GRACE says otherwise (the
#: settings table, pydra.config.SETTINGS, has the same default: a test keeps the two equal)
STOP_GRACE = 30.0

#: what stops a rank (SIGUSR2: Open MPI's launcher passes it on untouched, see pydra.interrupts.RELAYED_STOP)
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


def world_rank() -> int | None:
    """This process's rank in the MPI job, as its launcher says, or None if not under one."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def stop_grace() -> float:
    """``PYDRA_STOP_GRACE``: seconds a rank told to stop has before it is killed.

    Read here, not through :mod:`pydra.config`, which this module must not
    import. A value that does not read as a positive number counts as unset:
    the rank's own ``pydra`` refuses it in one line before MPI starts.
    """
    try:
        seconds = float(os.environ.get("PYDRA_STOP_GRACE", ""))
    except ValueError:
        return STOP_GRACE
    return seconds if 0 < seconds < float("inf") else STOP_GRACE


def supervise(program: list[str]) -> int:
    """Run *program* as a child and return the status this process should exit with."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    steps, report = os.pipe()  # the rank writes its start-up steps to *report* (pydra.startup)
    os.set_inheritable(report, True)
    # The ranks of this job on this host are all children of one launcher process: its pid names the socket.
    address = f"pydra-death-notices-{os.getuid()}-{os.getppid()}"
    env = {**os.environ, "PYDRA_STARTUP_FD": str(report), NOTICES_VARIABLE: address}
    started = env.pop(STARTED_VARIABLE, "")
    if started and world_rank() in (0, None):
        _send(started, b"started")  # pydra run -n: an mpiexec that exits 0 having started no rank 0 is caught
    # close_fds=False: the rank needs the launcher's fds (MPICH's PMI_FD), and *report*.
    child = subprocess.Popen(program, close_fds=False, env=env)
    os.close(report)
    stopping: list[int] = []
    last_step = _StepReader(steps)
    grace = stop_grace()

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        if len(stopping) > 1 or last_step() not in (JOINED, LEFT):
            # A second stop, or a rank still starting, with nothing to save: it may be deaf to signals,
            # waiting in MPI's start-up (C code) for a rank that is gone. It ends now, not after its grace.
            child.kill()
            return
        child.send_signal(signum)
        killer = threading.Timer(grace, child.kill)
        killer.daemon = True
        killer.start()

    for signum in _STOPS:
        signal.signal(signum, stop)
    status = child.wait()
    rank = world_rank()
    if stopping:
        return status if status >= 0 else 128 - status  # stopped as asked: the job is ending, quietly
    step = last_step()
    how = f"exited with status {status}" if status >= 0 else f"was killed by {signal.Signals(-status).name}"
    # A rank that leaves during start-up, other than by an exit the ranks agreed on (which reports
    # `left` first, see pydra.cli), leaves the others waiting for it inside MPI's start-up or a
    # collective forever: end the job. Hydra stops every rank once one has died by a signal. (An exit
    # before MPI started is every rank's own: a bad command line, say.)
    if step not in (JOINED, LEFT) and (status < 0 or step):
        where = step or "before it had started MPI"
        print(f"pydra: rank {rank} (pid {child.pid}) {how} during start-up, {where}; ending the job",
              file=sys.stderr, flush=True)
        end_job()
    if rank == 0 and status >= 0 and step == JOINED:
        # Every end of rank 0's on purpose says `left` first: this one came from inside the job (a
        # task's os._exit(N) once no worker was left), which ended unfinished and unreported.
        print(f"pydra: rank 0 (pid {child.pid}) exited with status {status} in the middle of the job (a task's "
              "os._exit?); the job did not finish", file=sys.stderr, flush=True)
        return 1
    if under_ulfm():
        if status >= 0 and rank not in (0, None) and step == JOINED:
            # Lost in its session: ULFM reports a death by a signal at once (an exit only to the
            # heartbeats), and prterun does not make it the job's status.
            status = -signal.SIGKILL
        return _end_as(status)  # ULFM tells the others of a death only if the launcher sees one
    if status >= 0 and (rank in (0, None) or step != JOINED):
        return status  # rank 0's status is the job's; a worker's, out of a session, is its program's own
    if status < 0:
        print(f"pydra: rank {rank} (pid {child.pid}) {how}", file=sys.stderr, flush=True)
    if rank == 0:
        return 128 - status  # the master is gone: the job has failed
    # A worker that ends in a session was lost (a task's os._exit, say): ends on purpose say `left`
    # first. Rank 0 carries on without it, and its status is not the job's.
    tell_rank_zero(address, rank, how)
    return 0


def under_ulfm() -> bool:
    """Whether this rank runs under Open MPI's ULFM (``mpiexec --with-ft ulfm``): MPI reports a death to the others."""
    return os.environ.get("OMPI_MCA_mpi_ft_enable") == "1"


def _end_as(status: int) -> int:
    """The status to exit with to end as the rank did (*status*, as ``Popen.wait`` gave it): by its signal too."""
    if status < 0:
        signum = signal.Signals(-status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # (those two cannot be handled anyway)
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum  # a signal that does not end a process by default
    return status


def end_job() -> None:
    """End the whole MPI job this rank belongs to (never returns).

    Hydra, and Open MPI without ULFM, stop every rank once one has died by a
    signal. Under ULFM (``OMPI_MCA_mpi_ft_enable=1``, set by ``mpiexec --with-ft
    ulfm``) the job would go on without this rank, or wait for it in MPI_Init
    forever: Open MPI's launcher is told to stop the job instead (SIGTERM,
    which it passes to every rank before it ends).
    """
    launcher = os.getppid()
    if under_ulfm() and _command_name(launcher) in _OPEN_MPI_LAUNCHERS:
        os.kill(launcher, signal.SIGTERM)
    _leave_a_witness()
    os.kill(os.getpid(), signal.SIGKILL)


def _leave_a_witness() -> None:
    """Fork a child that holds this process's stdout and stderr open until this process is dead.

    Hydra's proxy looks for a dead child (``waitpid``, ``WNOHANG``) only
    after news on the pipes it reads from its children. If this process
    held the last ends of its pipes, their closing could wake the proxy
    before the kernel had made this process a zombie: the proxy would find
    no one dead and, the other ranks waiting silently in a collective,
    never hear anything again (a CI job hung that way). The witness's own
    exit, once this process is a zombie, is the news that comes after.
    """
    supervisor = os.getpid()
    if os.fork() != 0:
        return
    deadline = time.monotonic() + WITNESS_WAIT
    while _state(supervisor) not in _DEAD and time.monotonic() < deadline:
        time.sleep(0.005)
    os._exit(0)


#: at most how long the witness of a supervisor's end waits for it (seconds; it takes microseconds)
WITNESS_WAIT = 10.0
#: process states of a dead process: a zombie, dead, or gone ('')
_DEAD = ("Z", "X", "")


def _state(pid: int) -> str:
    """Process *pid*'s state letter (R, S, Z...), or '' if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _command_name(pid: int) -> str:
    """The name of process *pid*'s program ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


class _StepReader:
    """The last step the rank reported on the pipe *steps* so far ('' for none), read as it is asked for."""

    def __init__(self, steps: int) -> None:
        os.set_blocking(steps, False)  # a process the rank started may hold the write end open still
        self.steps = steps
        self.last = ""
        self._rest = b""  # the start of a line not written whole yet

    def __call__(self) -> str:
        try:
            while chunk := os.read(self.steps, 4096):
                *lines, self._rest = (self._rest + chunk).split(b"\n")
                if lines:
                    self.last = lines[-1].decode(errors="replace")
        except BlockingIOError:
            pass
        return self.last


def tell_rank_zero(address: str, rank: int, how: str) -> None:
    """Tell rank 0, if it listens on this host, that worker *rank* ended (*how*); best effort."""
    _send(address, f"{rank} {how}".encode())  # (if not: rank 0 is on another host, or gone, and its heartbeats tell)


def _send(address: str, message: bytes) -> None:
    """Send *message* to the abstract datagram socket *address*, if anything listens there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, "\0" + address)
    except OSError:
        pass


class Notices:
    """A datagram socket (Linux abstract namespace) at *address* that hears only this user's processes.

    The kernel vouches for each sender's uid, so no one else can make rank 0
    drop a healthy worker, say. ``OSError`` if it cannot be made (no such
    namespace, or the address is taken).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind("\0" + address)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def messages(self) -> list[str]:
        """What this user's processes have sent since the last look."""
        messages = []
        space = socket.CMSG_SPACE(3 * 4)  # struct ucred: pid, uid, gid
        while True:
            try:
                data, ancillary, _flags, _sender = self.sock.recvmsg(256, space)
            except (BlockingIOError, InterruptedError):
                return messages
            uid = next((int.from_bytes(body[4:8], sys.byteorder) for level, kind, body in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if uid == os.getuid():
                messages.append(data.decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()


class DeathNotices(Notices):
    """Rank 0's end of the death notices, at the address its supervisor gives (:data:`NOTICES_VARIABLE`)."""

    @classmethod
    def open(cls) -> "DeathNotices | None":
        """Rank 0's socket if this rank runs under the supervisor (and no other rank 0 took it), else None."""
        address = os.environ.get(NOTICES_VARIABLE, "")
        if not address or not hasattr(socket, "SO_PASSCRED"):
            return None
        try:
            return cls(address)
        except OSError:
            return None

    def take(self) -> list[tuple[int, str]]:
        """The notices that have arrived: ``(rank, how it ended)`` each."""
        notices = []
        for message in self.messages():
            rank, _, how = message.partition(" ")
            if rank.isdigit():
                notices.append((int(rank), how))
        return notices


def main() -> None:
    program = sys.argv[1:]
    if not program:
        print("usage: python -m pydra.launcher.supervise PROGRAM [ARG...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(supervise(program))


if __name__ == "__main__":
    main()
