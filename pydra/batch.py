"""``pydra run``: run one task tree as an MPI job and report its result.

Run under ``mpiexec -n N python -m pydra run ...`` every rank executes
:func:`run_job`; rank 0 resolves the target, ships it to the others, and
prints or writes the result. ``pydra run -n N`` starts that mpiexec itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydra import interrupts
from pydra.config import setting
from pydra.errors import ItemFailed, RemoteTraceback, TargetError, user_traceback
from pydra.jobstates import JobState, JobStateError

if TYPE_CHECKING:
    from pydra.launcher.supervise import Notices

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: ranks per CPU beyond which ``pydra run -n`` warns that the host is oversubscribed
OVERSUBSCRIBED = 4


def run_locally(ranks: int, forwarded: list[str], command: str = "run", resume_with: str | None = None) -> int:
    """Start ``mpiexec -n ranks python -m pydra COMMAND ...`` on this host only and return its status.

    With ``PYDRA_SEAL=1`` the job gets a fresh ``PYDRA_JOB_KEY`` and seals its messages.
    *resume_with* is the command that resumes the job, less ``--resume DIR`` (rank 0 says it).
    """
    from pydra.launcher.jobwatch import JobWatch
    from pydra.launcher.mpiexec import MPIExecError, find_mpiexec
    from pydra.launcher.supervise import STARTED_VARIABLE

    try:
        mpiexec = find_mpiexec()
    except MPIExecError as exc:
        print(f"pydra: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if setting("MPIEXEC") else EXIT_FAILED  # a bad setting is the user's to mend
    cpus = os.cpu_count() or 1
    if ranks > OVERSUBSCRIBED * cpus:  # more often a typo than a plan; mpiexec starts them all regardless
        print(f"pydra: warning: -n {ranks} starts {ranks} ranks on this host's {cpus} CPUs: "
              f"each gets about 1/{ranks // cpus} of a core", file=sys.stderr)
    env = progress_environment()
    if setting("SEAL"):
        import secrets

        # A fresh key for this job only; the ranks read it and drop it from their environment.
        env["PYDRA_JOB_KEY"] = secrets.token_hex(32)
    if resume_with:
        env["PYDRA_RESUME_WITH"] = resume_with
    program = [sys.executable, "-m", "pydra", command, *forwarded]
    watch = JobWatch()
    started = _started_notices()  # where rank 0's supervisor says rank 0 has started
    if started is not None:
        env[STARTED_VARIABLE] = started.address
    try:
        status = watch.conclude(wait_for(mpiexec.local_command(ranks, program), env, stop_with=mpiexec.stop_signal,
                                         preexec_fn=ends_with_this_process(), watch_stderr=watch))
        if status == EXIT_OK and started is not None and "started" not in started.messages():
            print(f"pydra: error: {mpiexec.path} exited with status 0 but never started rank 0 "
                  "(an mpiexec that does not run its command?)", file=sys.stderr)
            return EXIT_FAILED
    finally:
        if started is not None:
            started.close()
    return status


def _started_notices() -> Notices | None:
    """:class:`~pydra.launcher.supervise.Notices` at a new address, or None where there can be none (not Linux)."""
    from pydra.launcher.supervise import Notices

    try:  # os.urandom, not secrets: a name need not be a secret, and secrets costs 6 ms to import
        return Notices(f"pydra-started-{os.getpid()}-{os.urandom(8).hex()}")
    except (OSError, AttributeError):  # no abstract namespace, or no SO_PASSCRED
        return None


def ends_with_this_process() -> Callable[[], None]:
    """mpiexec's ``preexec_fn``: it gets SIGTERM when this process dies, however it dies.

    Else a ``pydra run -n`` killed outright (``kill -9``) would leave its job
    running to the end. (Linux's ``PR_SET_PDEATHSIG``, which fires when the
    thread that started mpiexec ends: the main thread, which waits for it.)
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: after fork, only the call
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # gone already, before the request was made
            os._exit(1)

    return preexec


def progress_environment() -> dict[str, str]:
    """This environment, telling the ranks to draw a progress bar if we are on a terminal.

    A rank's stderr is a pipe to mpiexec even when someone watches it.
    """
    from pydra.progress import progress_mode

    return {**os.environ, "PYDRA_PROGRESS": progress_mode()}


def wait_for(command: list[str], env: dict[str, str], preexec_fn: Callable[[], None] | None = None,
             stop_with: int = signal.SIGTERM, watch_stderr: StderrWatch | None = None,
             stop_hard: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Start mpiexec's *command* in a session of its own, wait for it and return the job's exit status.

    With *watch_stderr*, mpiexec's stderr is relayed to ours through a pipe:
    each piece of it goes through *watch_stderr*, which says what of it to
    pass on, and may say the job is over (``ends_job``): *stop_hard*, if
    given, then ends it at once.

    In its own session, a terminal's Ctrl-C reaches us alone. On SIGINT,
    SIGTERM or SIGHUP, mpiexec gets *stop_with* (its ``stop_signal``) and
    passes a stop on to every rank (rank 0 then says how to resume); we wait
    while they stop, so that nothing is left behind, and return 128 + the
    signal we got. A second signal, or a job still running
    :data:`HARD_STOP_MARGIN` seconds after the ranks' grace
    (``PYDRA_STOP_GRACE``) since the first, gets *stop_hard* (default:
    SIGTERM, which every mpiexec obeys itself).
    """
    received: list[int] = []
    passed_on: list[int] = []  # the stops mpiexec was given
    process: subprocess.Popen | None = None
    hard = stop_hard or _terminate
    hard_after = setting("STOP_GRACE") + HARD_STOP_MARGIN

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        if watch_stderr is not None:
            watch_stderr.stopping = True
        if process is not None and process.returncode is None:
            pass_on(process)

    def pass_on(started: subprocess.Popen) -> None:
        passed_on.append(received[-1])
        if len(received) > 1:
            hard(started)
            return
        started.send_signal(stop_with)
        # Hydra may never end: a stop it fails to pass on to a host whose proxy has gone can
        # leave it waiting for the other hosts for good (seen during start-up).
        timer = threading.Timer(hard_after, lambda: started.returncode is None and hard(started))
        timer.daemon = True
        timer.start()

    # Caught from before mpiexec starts: it no longer hears the terminal, so it must hear from us.
    previous = {signum: signal.signal(signum, stop) for signum in interrupts.STOPS}
    try:
        # restore_signals=False: mpiexec keeps our SIGPIPE ignored. Hydra passes its stdin on to a
        # proxy whenever it comes and ignores a failed write, where a SIGPIPE would kill it (a
        # finished `pydra launch` once exited 243 in CI: -13, a SIGPIPE, passed on as it was).
        process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=preexec_fn,
                                   stderr=subprocess.PIPE if watch_stderr else None, restore_signals=False)
        relay = _relay(process, watch_stderr, stop_hard) if watch_stderr else None
        if received and not passed_on:  # stopped while mpiexec started: as if just now
            pass_on(process)
        status = process.wait()
        if relay is not None:
            relay.join(RELAY_GRACE)  # what mpiexec wrote last (a daemon mpiexec left behind may hold the pipe)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        return 128 + received[0]
    # (a negative status: mpiexec itself was killed by that signal)
    return status if status >= 0 else 128 - status


#: seconds the launcher waits, once mpiexec has ended, for the rest of its stderr
RELAY_GRACE = 5.0

#: seconds past the ranks' own grace (PYDRA_STOP_GRACE, pydra.launcher.supervise) before a stopped mpiexec is
#: stopped hard: time for the killed ranks' launcher to end the job itself
HARD_STOP_MARGIN = 15.0


class StderrWatch(Protocol):
    """What looks at mpiexec's stderr as :func:`wait_for` relays it."""

    #: set once what went by means the job is over: it is then stopped hard
    ends_job: bool
    #: set by wait_for once it stops the job
    stopping: bool

    def __call__(self, chunk: bytes) -> bytes:
        """Look at the next *chunk* of mpiexec's stderr; return what of it to pass on."""


def _terminate(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)


def _relay(process: subprocess.Popen, watch: StderrWatch,
           stop_hard: Callable[[subprocess.Popen], None] | None) -> threading.Thread:
    """A thread that copies *process*'s stderr to ours as it comes, through *watch*."""
    def copy() -> None:
        stopped = False
        while chunk := process.stderr.read1(64 * 1024):
            kept = watch(chunk)
            if watch.ends_job and stop_hard and not stopped and process.returncode is None:
                stopped = True
                stop_hard(process)
            with contextlib.suppress(OSError):  # nobody reads our stderr any more: the job goes on
                sys.stderr.buffer.write(kept)
                sys.stderr.buffer.flush()

    thread = threading.Thread(target=copy, name="pydra-stderr", daemon=True)
    thread.start()
    return thread


@dataclass
class JobRequest:
    """What ``pydra run`` was asked to do (rank 0 fills it in from a journal on ``--resume``)."""

    target: str | None
    inputs: list[str]
    output: str | None = None
    run_dir: str | None = None
    resume: str | None = None
    journal: bool = True


def run_job(request: JobRequest) -> int:
    """Collective over MPI.COMM_WORLD: run the requested job; the exit status for this rank.

    Raises :class:`~pydra.comm.seal.SealConfigError` on every rank if the
    sealing settings are unusable.
    """
    interrupts.stop_quietly()  # before MPI starts: an interrupted job ends without a traceback
    from mpi4py import MPI

    from pydra import cpus, target as targets
    from pydra._core.session import abort_on_uncaught_exit
    from pydra.comm import mpi
    from pydra.launcher.allocation import refuse_foreign_world

    comm = MPI.COMM_WORLD
    if refuse_foreign_world(comm):  # N copies of a one-rank job would each run it all
        return EXIT_USAGE
    interrupts.joined(comm.rank, comm.size)
    mpi.start_sealing(comm)  # raises SealConfigError on every rank, for pydra.cli to report once
    abort_on_uncaught_exit(comm)  # from here on, no rank may leave the others waiting
    cpus.share_cores(comm)  # before the TARGET's imports load numpy's OpenBLAS and the like
    root = spec = record = None
    if comm.rank == 0:
        from pydra.journal import JournalError  # rank 0 keeps the journal; the workers never load it

        try:
            record = resume_record(Path(request.resume)) if request.resume else None
            if record is not None and request.output:  # --resume DIR --output PATH: the result goes there now
                record.output = str(Path(request.output).resolve())
            spec = record.spec if record is not None else targets.read_target(request.target or "")
            root = targets.resolve(spec, targets.load_module(spec))
            if record is None and request.journal:  # only for a target that loads
                record = new_record(spec, request)
        except (TargetError, JournalError) as exc:
            spec = exc  # tells the other ranks to stop too
            print(f"pydra: error: {exc}", file=sys.stderr)
    # Sealed, when the job seals: the spec holds the task file's source, which workers execute.
    spec, inputs = mpi.bcast_object(comm, (spec, request.inputs if record is None else record.inputs), 0, "bcast-spec")
    if isinstance(spec, Exception):
        return EXIT_USAGE
    problem = None
    if comm.rank != 0:
        try:
            targets.load_module(spec)
        except TargetError as exc:
            problem = str(exc)
    refused = "its report did not open (see the pydra.seal warning above)"
    problems = mpi.gather_object(comm, problem, 0, "gather-problems", refused=refused)
    failed = mpi.bcast_object(comm, [(rank, p) for rank, p in enumerate(problems or []) if p], 0, "bcast-failures")
    if failed:
        if comm.rank == 0:
            for rank, text in failed:
                print(f"pydra: error: on rank {rank}: {text}", file=sys.stderr)
        return EXIT_USAGE
    return _run_root(comm, spec.text, root, inputs, record, request.output if record is None else record.output)


def _run_root(comm: Any, target: str, root: Any, inputs: list[str], record: "JobRecord | None", output: str | None) -> int:
    """Collective: run *root* on *inputs*, journaled in *record*; report the result on rank 0."""
    if comm.rank != 0:
        from pydra._core.session import run_session

        run_session(comm)  # what an Executor does on a worker, without loading rank 0's half
        return EXIT_OK  # rank 0 reports
    from pydra._core.evaluate import Walk
    from pydra.comm import failures
    from pydra.executor import Executor
    from pydra.progress import ProgressReporter, progress_mode

    started = time.monotonic()
    with Executor(comm) as executor:
        assert executor is not None  # rank 0
        master = executor.master
        job = Walk.start(master, root, inputs, record.log if record else None)
        reporter = ProgressReporter(job.progress, target, progress_mode()).start()
        try:
            try:
                result = job.result()
            finally:
                reporter.stop()
            if record is not None:
                record.finish(output)
            status = _report(target, result, output, time.monotonic() - started, comm.size)
        except Exception as exc:
            report_failure(target, exc)
            if record is not None:
                record.fail(exc)
            status = EXIT_FAILED
    if master.lost_ranks:
        if master.stuck_ranks:
            print(f"pydra: worker ranks {master.stuck_ranks} are blocked in MPI with a lost rank; "
                  f"ending the job with MPI_Abort({status})", file=sys.stderr)
        failures.end_job_after_loss(comm, status, master.stuck_ranks)
    return status


def _report(target: str, result: Any, output: str | None, elapsed: float, size: int) -> int:
    """Print the result, or write it to *output*; the exit status."""
    where = "in one process" if size == 1 else f"on {size} ranks"
    if output is None:
        print(f"pydra: {target} finished in {elapsed:.2f} s {where}: {summarise(result)}")
        return EXIT_OK
    try:
        write_json(result, Path(output))
    except (TypeError, ValueError, OSError) as exc:
        print(f"pydra: error: cannot write the result to {output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"pydra: {target} finished in {elapsed:.2f} s {where}; result written to {output}")
    return EXIT_OK


class JobRecord:
    """A batch job's entry in the journal of its run directory (rank 0).

    Its ``log`` is the job's :class:`~pydra.journal.UnitRecorder`: finished
    units go to the journal as they arrive, and a resumed job finds the units
    of the earlier run there.
    """

    def __init__(self, journal: Any, job: int, spec: Any, inputs: list[str], output: str | None, resumed: bool) -> None:
        from pydra.journal import UnitRecorder

        self.journal, self.job, self.spec, self.inputs, self.output = journal, job, spec, inputs, output
        self.log = UnitRecorder(journal, job, resumed)

    def finish(self, output: str | None) -> None:
        self.journal.set_state(self.job, JobState.DONE, result_path=output)
        self.journal.close()

    def fail(self, error: BaseException) -> None:
        """Record the job as failed, if the journal can still be written."""
        from pydra.journal import JournalError

        try:
            self.journal.set_state(self.job, JobState.FAILED, error=f"{type(error).__name__}: {error}")
            self.journal.close()
        except JournalError as exc:
            print(f"pydra: error: {exc}", file=sys.stderr)


def resume_record(run_dir: Path) -> JobRecord:
    """The journal entry of the job to finish in *run_dir* (``--resume``)."""
    from pydra import journal as journals
    from pydra import target as targets

    journal = journals.Journal.open(run_dir, create=False)
    try:
        jobs = journal.jobs()
        if not jobs:
            raise journals.JournalError(f"the journal in {run_dir} holds no job to resume")
        job = jobs[-1]  # a batch run directory holds one job
        spec = targets.TargetSpec(**job["options"]["spec"])
        try:
            journal.set_state(job["id"], JobState.RUNNING)  # from running (rank 0 died), done or failed
        except JobStateError as exc:
            raise journals.JournalError(f"cannot resume the job in {run_dir}: {exc}") from exc
        record = JobRecord(journal, job["id"], spec, job["inputs"], job["options"]["output"], resumed=True)
    except BaseException:
        journal.close()
        raise
    print(f"pydra: resuming {spec.text} from {run_dir} ({record.log.units_recorded()} units journaled)", file=sys.stderr)
    interrupts.journaling(run_dir, journal)
    return record


def new_record(spec: Any, request: JobRequest) -> JobRecord:
    """The journal entry of the job of *spec*: new, in a new run directory or in ``--run-dir DIR``.

    If DIR already journals this same job (TARGET, INPUTs and the task file's
    source unchanged: a requeued batch job, the same command run again after
    a crash), that job is resumed instead; a journal of another job there is
    refused, so that no run directory ever mixes two jobs.
    """
    import dataclasses
    import hashlib

    from pydra import journal as journals, rundirs

    try:
        run_dir = Path(request.run_dir) if request.run_dir else rundirs.new_run_dir(spec.text)
    except OSError as exc:  # PYDRA_HOME unwritable, a full disk: the user's to fix, in one line
        raise journals.JournalError(f"cannot make a run directory: {exc} (give --run-dir DIR or --no-journal)") from exc
    output = str(Path(request.output).resolve()) if request.output else None
    digest = hashlib.sha256(spec.source.encode()).hexdigest() if spec.source is not None else None
    if request.run_dir and (run_dir / journals.JOURNAL_NAME).is_file():
        earlier = _journaled_job(run_dir)
        if earlier is not None:
            different = _difference(earlier, spec.text, request.inputs, digest)
            if different:
                raise journals.JournalError(f"{run_dir} journals another job ({different}): give a new --run-dir, "
                                            f"or finish that one with --resume {run_dir}")
            record = resume_record(run_dir)
            record.output = output  # this command's --output, as a new run would use it
            return record
    try:
        journal = journals.Journal.open(run_dir, create=True)
    except OSError as exc:  # a parent that is not there, a file of that name, a read-only file system
        raise journals.JournalError(f"cannot make the run directory {run_dir}: {exc.strerror or exc}") from exc
    options = {"spec": dataclasses.asdict(spec), "output": output, "cwd": os.getcwd()}
    job = journal.add_job(spec.text, request.inputs, options, digest)
    journal.set_state(job, JobState.RUNNING)
    print(f"pydra: run directory {run_dir} (resume with: {interrupts.resume_command(run_dir)})", file=sys.stderr)
    interrupts.journaling(run_dir, journal)
    return JobRecord(journal, job, spec, request.inputs, output, resumed=False)


def _journaled_job(run_dir: Path) -> dict | None:
    """The job the journal in *run_dir* holds, or None if it holds none yet."""
    from pydra import journal as journals

    journal = journals.Journal.open(run_dir, create=False)
    try:
        jobs = journal.jobs()
    finally:
        journal.close()
    return jobs[-1] if jobs else None


def _difference(job: dict, target: str, inputs: list[str], digest: str | None) -> str | None:
    """How the journaled *job* differs from the job of *target* on *inputs* whose source has *digest*; None if not."""
    if job["target"] != target:
        return f"of {job['target']}, not {target}"
    if job["inputs"] != list(inputs):
        return f"with the inputs {' '.join(job['inputs']) or '(none)'}"
    if job["source_sha256"] != digest:
        return f"of an earlier version of {target}"
    return None


def report_failure(target: str, exc: BaseException) -> None:
    """Print a task failure: the traceback of the user's code, if it has one, then a one-line summary.

    A one-process run reports as a run on many ranks does: the failing rank's
    traceback headed ``Worker {rank} of {size} on {host}``, from the user's
    first frame; a failure in no frame of the user's (a gang larger than the
    job, a result that cannot be pickled) is the summary line alone.
    """
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        if cause.frames:
            print(cause.text.strip("\n"), file=sys.stderr)
    else:
        text, frames = user_traceback(exc)  # raised on rank 0 itself
        if frames:
            print(text.rstrip("\n"), file=sys.stderr)
    notes = "; ".join(getattr(exc, "__notes__", []))
    where = f" ({notes})" if notes else ""
    print(f"pydra: {target} failed: {type(exc).__name__}: {exc}{where}", file=sys.stderr)


def summarise(result: Any, limit: int = 200) -> str:
    """A one-line description of a result, short enough for a terminal."""
    text = repr(result)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(result, (dict, list, tuple)):
        return f"{type(result).__name__} of {len(result)}: {text}"
    return text


def write_json(result: Any, path: Path) -> None:
    """Write *result* as JSON to *path*, through a symbolic link to the file it names.

    A regular file (or none yet) is written atomically, so a reader never
    sees half of it: a new file beside it, renamed over it, with the old
    file's mode (a new one's follows the umask, as the shell's ``>`` does).
    Anything else, a device (``/dev/stdout``) or a named pipe, is written
    into, never replaced. The JSON is strict: NaN and the infinities, which
    it cannot hold, are written as the strings ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"`` (as Protocol Buffers' JSON form does).
    """
    import json
    import stat

    try:
        text = json.dumps(result, default=_json_default, indent=1, allow_nan=False) + "\n"
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise  # a circular reference, say
        # Rare, so only then the walk through the whole result that spells them out.
        text = json.dumps(_spelled(result), default=lambda value: _spelled(_json_default(value)),
                          indent=1, allow_nan=False) + "\n"
    path = Path(os.path.realpath(path))
    try:
        mode: int | None = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.urandom(4).hex()}")  # a unique name (O_EXCL), not a secret
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to `>`
    try:
        with open(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        if mode is not None:
            os.chmod(temporary, stat.S_IMODE(mode))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)  # a full disk leaves no half-written file behind
        raise


def _spelled(value: Any) -> Any:
    """*value* with every NaN and infinity, as a float or a dict's key, spelled as a JSON string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {_spelled(key) if isinstance(key, float) else key: _spelled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_spelled(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays are common results; anything else is the task's to convert.
    if isinstance(value, ItemFailed):
        return {"item_failed": value.index, "error": value.error}
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"a result of type {type(value).__name__} has no JSON form")
