"""Service mode: the cluster stays up and rank 0 runs jobs from a queue.

``pydra serve`` (also ``pydra run --serve`` and ``pydra launch --serve``)
enters a session on every rank; the workers serve rank 0 as in batch mode,
and rank 0 runs a :class:`Service`: jobs are submitted while it runs
(through the control endpoint, :mod:`pydra.control`), wait in a queue
ordered by priority (higher first) then submission time, and up to
``max_jobs`` of them share the workers at once. Every job, its state
transitions, timings, result file and error are kept in the journal of the
service's run directory, so the history outlives the cluster. The service
runs until told to shut down.

A job moves only along :data:`pydra.jobstates.TRANSITIONS`, the table the
journal enforces too; a running job is known by its
:class:`~pydra._core.jobs.JobHandle` alone (progress, cancel, statistics,
the workers running its units).
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydra import importcheck, target as targets
from pydra._core.evaluate import Walk
from pydra._core.jobs import JobHandle
from pydra._core.master import Master
from pydra._core.phases import Phase
from pydra.config import setting
from pydra.control import CONFIG, REQUESTS
from pydra.errors import PydraError, RemoteTraceback, TargetError
from pydra.jobstates import (ACTIVE, EDITABLE, INITIAL, TRANSITIONS, JobState, check_move, describe_states,
                             sources_of)
from pydra.journal import Journal, UnitRecorder


class ServiceError(PydraError):
    """A request the service cannot carry out (an unknown job, a job in the wrong state)."""


NO_WORKER_LEFT = ("every worker rank was lost, and an MPI job cannot start new ones: this cluster runs no more "
                  "jobs; shut it down and start a new one")

#: every state ``workers`` may show (see pydra._core.master), as ``status`` counts them
WORKER_STATES = tuple(phase.value for phase in Phase)


@dataclass
class Job:
    """A job in the service's queue, running, or finished."""

    id: int
    target: str
    inputs: list[str]
    priority: int
    submitted: float
    state: JobState = INITIAL
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    traceback: str | None = None
    result_path: str | None = None
    #: the handle of its last run (None while queued)
    handle: JobHandle | None = None
    tries: int = 0
    #: its target, read and imported in a child process at submission (or retry): :func:`checked`
    spec: targets.TargetSpec | None = None
    #: why its target cannot load, if the check said so (the job fails when it starts)
    unloadable: str | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``jobs`` and ``job ID`` show)."""
        done, total = self.handle.progress() if self.handle is not None else (0, None)
        return {
            "id": self.id,
            "target": self.target,
            "inputs": self.inputs,
            "priority": self.priority,
            "state": self.state.value,
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "seconds": (self.finished or time.time()) - self.started if self.started else None,
            "items_done": done,
            "items_total": total,
            "error": self.error,
            "traceback": self.traceback,
            "result_path": self.result_path,
        }


class Service:
    """Rank 0's job queue over a running :class:`Master` (thread-safe)."""

    def __init__(self, master: Master, journal: Journal, run_dir: Path, cluster_id: str, max_jobs: int = 4) -> None:
        self.master = master
        self.journal = journal
        self.run_dir = run_dir
        self.cluster_id = cluster_id
        self.max_jobs = max_jobs
        self.started = time.time()
        self.paused = False
        self.jobs: dict[int, Job] = {}
        self._lock = threading.RLock()
        self._ended = threading.Event()
        self._shutting_down = False
        self._workerless = False  # every worker rank is lost: no job can run any more
        (run_dir / "results").mkdir(exist_ok=True)
        master.log_hook = self._attribute_log
        # Rank 0 holds the control plane and every job: it never runs task code (isolated or not) itself.
        master.no_worker_hook = self._no_worker_left
        master.scheduler.take_over = False

    # -- the queue ---------------------------------------------------------------------------

    def submit(self, target: str, inputs: list[str], priority: int = 0) -> dict[str, Any]:
        """Queue *target* on *inputs*; the new job's summary."""
        self._refuse_new_jobs()
        spec, unloadable = checked(target)  # outside the lock: an import that takes its time holds up no one
        with self._lock:
            self._refuse_new_jobs()
            job_id = self.journal.add_job(target, list(inputs), {"service": self.cluster_id}, None, priority)
            job = Job(job_id, target, list(inputs), priority, time.time(), spec=spec, unloadable=unloadable)
            self.jobs[job_id] = job
            self._start_ready()
            return job.describe()

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel a queued or running job."""
        with self._lock:
            job = self._job_may_become(job_id, JobState.CANCELLED, "cancelled")
            self._finish(job, JobState.CANCELLED, error="cancelled by the admin")  # first: _on_done then ignores it
            if job.handle is not None:  # it was running (a queued job has none)
                job.handle.cancel()
            self._start_ready()
            return job.describe()

    def set_priority(self, job_id: int, priority: int) -> dict[str, Any]:
        """Change a queued job's priority."""
        with self._lock:
            job = self._job(job_id)
            if job.state not in EDITABLE:
                only = describe_states(EDITABLE)
                raise ServiceError(f"job {job_id} is {job.state}: only {only}'s priority can change")
            job.priority = priority
            self.journal.set_priority(job_id, priority)
            return job.describe()

    def retry(self, job_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled job again (units its earlier runs journaled are not redone).

        Its target is read and checked again: a task file fixed since is used.
        """
        self._refuse_new_jobs()
        spec, unloadable = checked(self._job_may_become(job_id, JobState.QUEUED, "retried").target)
        with self._lock:
            self._refuse_new_jobs()
            job = self._job_may_become(job_id, JobState.QUEUED, "retried")
            job.spec, job.unloadable = spec, unloadable
            self._move(job, JobState.QUEUED)
            job.error, job.traceback, job.finished, job.handle = None, None, None, None
            self._start_ready()
            return job.describe()

    def pause(self) -> None:
        """Start no more jobs (those running go on)."""
        with self._lock:
            self.paused = True

    def resume(self) -> None:
        """Start queued jobs again."""
        with self._lock:
            self.paused = False
            self._start_ready()

    def shutdown(self, now: bool = False) -> None:
        """Take no more jobs; end once the queued and running ones are done (*now*: cancel them instead).

        A paused queue is resumed, so that the jobs already submitted all run.
        """
        with self._lock:
            self._shutting_down, self.paused = True, False
            self._start_ready()
            if now:
                for job in list(self.jobs.values()):
                    if job.state in ACTIVE:
                        self.cancel(job.id)
            self._check_ended()

    def wait(self) -> None:
        """Block until the service has shut down."""
        self._ended.wait()

    def drain(self, rank: int) -> dict[str, Any]:
        """Let worker *rank* finish its units and give it no more."""
        self._worker(rank)
        self.master.call_soon(self.master.drain, rank)
        return {"rank": rank, "draining": True}

    def undrain(self, rank: int) -> dict[str, Any]:
        """Let worker *rank*, drained or draining, take work again (a worker that takes work already is left so)."""
        self._worker(rank)
        self.master.call_soon(self.master.undrain, rank)
        return {"rank": rank, "draining": False}

    def restart(self, rank: int) -> dict[str, Any]:
        """Restart worker *rank*'s executor: its isolated child process (needs isolation)."""
        self._worker(rank)
        if not setting("ISOLATE"):
            raise ServiceError("workers run task code in-rank (the cluster was started without --isolate): no executor to restart")
        self.master.call_soon(self.master.restart, rank)
        return {"rank": rank, "restarted": True}

    def logs(self, job_id: int | None = None, rank: int | None = None, after: int = 0) -> list[dict[str, Any]]:
        """Log records collected on rank 0 (tasks' and the cluster's), numbered; those after number *after*."""
        if job_id is not None:
            self._job(job_id)
        size = self.master.comm.size
        if rank is not None and not 0 <= rank < size:  # rank 0 logs too: the cluster's own events
            raise ServiceError(f"no rank {rank}: the ranks are 0..{size - 1}")
        records = [record for record in list(self.master.logs) if record["number"] > after]
        return [
            record for record in records
            if (job_id is None or record["job"] == job_id) and (rank is None or record["rank"] == rank)
        ]

    def handle(self, command: str, args: dict) -> Any:
        """Carry out a control request: *command* with JSON *args*.

        The request must have passed :func:`pydra.control.validate_request`
        (the control endpoint checks every one against
        :data:`pydra.control.REQUESTS`): a method here trusts its arguments' types.
        """
        request = REQUESTS.get(command)
        if request is None:
            raise ServiceError(f"unknown command {command!r}: expected one of {', '.join(sorted(REQUESTS))}")
        return getattr(self, request.method)(**args)

    # -- observation -------------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: host, state, the job it works for, units done, failures, heartbeat age, CPU, memory."""
        jobs_of: dict[int, set[int]] = {}
        with self._lock:
            running = [(job.id, job.handle) for job in self.jobs.values()
                       if job.state is JobState.RUNNING and job.handle is not None]
        for job_id, handle in running:
            for rank in handle.ranks():
                jobs_of.setdefault(rank, set()).add(job_id)
        rows = self.master.statistics()["workers"]
        for row in rows:
            row["jobs"] = sorted(jobs_of.get(row["rank"], ()))
        return rows

    def status(self) -> dict[str, Any]:
        """Cluster id, uptime, ranks, hosts, workers by state, queue length, jobs by state."""
        stats = self.master.statistics()
        workers = stats["workers"]
        with self._lock:
            states = [job.state for job in self.jobs.values()]
        return {
            "cluster": self.cluster_id,
            "uptime": time.time() - self.started,
            "ranks": self.master.comm.size,
            "hosts": sorted({self.master.host, *(w["host"] for w in workers)}),
            "workers": {state: sum(w["state"] == state for w in workers) for state in WORKER_STATES},
            **{state.value: states.count(state) for state in JobState},  # queued, running, done, failed, cancelled
            "paused": self.paused,
            "shutting_down": self._shutting_down,
            "run_dir": str(self.run_dir),
        }

    def list_jobs(self, everything: bool = False) -> list[dict[str, Any]]:
        """Queued and running jobs (with *everything*, finished ones too), in queue order."""
        with self._lock:
            jobs = [job for job in self.jobs.values() if everything or job.state in ACTIVE]
            return [job.describe() for job in sorted(jobs, key=self._queue_order)]

    def queue(self) -> list[dict[str, Any]]:
        """The queued jobs, in the order they will start."""
        with self._lock:
            queued = sorted((job for job in self.jobs.values() if job.state is JobState.QUEUED), key=self._queue_order)
            return [job.describe() for job in queued]

    def job(self, job_id: int) -> dict[str, Any]:
        """One job in detail, with its state transitions and the statistics of its last run."""
        with self._lock:
            job = self._job(job_id)
            detail = job.describe()
            handle = job.handle
        detail["statistics"] = handle.statistics() if handle is not None else None
        detail["transitions"] = self.journal.transitions(job_id)
        return detail

    def configure(self, key: str | None = None, value: str | None = None) -> dict[str, Any]:
        """The runtime settings, after setting *key* to *value* if given."""
        if key is None and value is not None:
            raise ServiceError("config: a value needs a setting to go to")
        if key is not None:
            if key not in CONFIG:
                raise ServiceError(f"unknown setting {key!r}: expected one of {', '.join(CONFIG)}")
            if value is not None:
                kind = CONFIG[key][0]
                try:
                    parsed = kind(value)
                except ValueError:
                    raise ServiceError(f"{key} expects {kind.__name__}, got {value!r}") from None
                if not math.isfinite(parsed):  # nan passes every comparison below, inf never times out
                    raise ServiceError(f"{key} must be a finite number, got {value}")
                if parsed < 0 or (parsed == 0 and key != "retries"):
                    raise ServiceError(f"{key} must be {'0 or more' if key == 'retries' else 'positive'}, got {value}")
                if key == "heartbeat_timeout" and parsed <= 2 * setting("HEARTBEAT"):  # (every worker would be lost)
                    raise ServiceError(f"heartbeat_timeout must be more than twice the heartbeat, "
                                       f"{setting('HEARTBEAT'):g} s (PYDRA_HEARTBEAT), got {value}")
                self._apply(key, parsed)
                # The scheduler takes it on its own thread soon: the reply says the value set, not the one before.
                return {**{name: self._current(name) for name in CONFIG}, key: parsed}
        return {name: self._current(name) for name in CONFIG}

    # -- internals ---------------------------------------------------------------------------

    def _current(self, key: str) -> Any:
        if key == "max_jobs":
            return self.max_jobs
        scheduler = self.master.scheduler
        if key == "heartbeat_timeout":
            return scheduler.settings.heartbeat_timeout
        if key == "retries":
            return scheduler.least_retries
        return scheduler.settings.batch_seconds

    def _apply(self, key: str, value: Any) -> None:
        if key == "max_jobs":
            with self._lock:
                self.max_jobs = value
                self._start_ready()
        elif key == "heartbeat_timeout":
            if self.master.scheduler.settings.heartbeat_timeout is None:
                raise ServiceError("this MPI gives no heartbeats (no MPI_THREAD_MULTIPLE)")
            self.master.call_soon(setattr, self.master.scheduler.settings, "heartbeat_timeout", value)
        elif key == "retries":
            self.master.call_soon(setattr, self.master.scheduler, "least_retries", value)
        else:
            self.master.call_soon(setattr, self.master.scheduler.settings, "batch_seconds", value)

    def _attribute_log(self, record: dict) -> None:
        """Tell which running job a worker's record belongs to (its unit is still outstanding)."""
        uid = record["uid"]
        if uid is None:
            return
        for job in list(self.jobs.values()):
            handle = job.handle
            if job.state is JobState.RUNNING and handle is not None and handle.owns(uid):
                record["job"] = job.id
                return

    def _refuse_new_jobs(self) -> None:
        if self._shutting_down:
            raise ServiceError("the cluster is shutting down: it takes no new jobs")
        if self._workerless:
            raise ServiceError(NO_WORKER_LEFT)

    def _no_worker_left(self) -> None:
        """Every worker rank is lost (scheduler thread): fail the running and queued jobs, take no more."""
        with self._lock:
            self._workerless = True
            self.master.note(NO_WORKER_LEFT, level="ERROR")
            print(f"pydra: {NO_WORKER_LEFT}", file=sys.stderr, flush=True)
            for job in self.jobs.values():
                if job.state is JobState.RUNNING:
                    self._finish(job, JobState.FAILED, error=NO_WORKER_LEFT)  # first: _on_done then ignores it
                    if job.handle is not None:
                        job.handle.cancel()
            self._start_ready()  # the queued ones fail as they start

    def _worker(self, rank: int) -> None:
        if not any(w.rank == rank for w in self.master.workers) or rank == 0:
            raise ServiceError(f"no worker rank {rank}: the workers are ranks 1..{self.master.comm.size - 1}")

    def _job(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ServiceError(f"no job {job_id}")
        return job

    def _job_may_become(self, job_id: int, state: JobState, verb: str) -> Job:
        """Job *job_id*, which the table of transitions must let move to *state*; else say which jobs can be *verb*."""
        job = self._job(job_id)
        if (job.state, state) not in TRANSITIONS:
            raise ServiceError(f"job {job_id} is {job.state}: only {describe_states(sources_of(state))} can be {verb}")
        return job

    def _move(self, job: Job, state: JobState, error: str | None = None, result_path: str | None = None) -> None:
        """Move *job* to *state*, in memory and in the journal (which checks the move against the table too)."""
        check_move(job.state, state, job.id)  # a refused move changes neither
        job.state = state
        self.journal.set_state(job.id, state, error=error, result_path=result_path)

    @staticmethod
    def _queue_order(job: Job) -> tuple:
        running_first = 0 if job.state is JobState.RUNNING else 1
        return (running_first, -job.priority, job.submitted, job.id)

    def _start_ready(self) -> None:
        # Called with the lock held.
        if self.paused:
            return
        running = sum(job.state is JobState.RUNNING for job in self.jobs.values())
        for job in sorted((j for j in self.jobs.values() if j.state is JobState.QUEUED), key=self._queue_order):
            if running >= self.max_jobs:
                return
            self._start(job)
            running += job.state is JobState.RUNNING  # one that failed to start takes no place

    def _start(self, job: Job) -> None:
        self._move(job, JobState.RUNNING)
        job.started, job.finished, job.tries = time.time(), None, job.tries + 1
        spec = job.spec
        if spec is None or self._workerless:
            self._finish(job, JobState.FAILED, error=NO_WORKER_LEFT if self._workerless else job.unloadable)
            return
        try:
            root = targets.resolve(spec, targets.load_module(spec))
        except TargetError as exc:
            self._finish(job, JobState.FAILED, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - e.g. TypeError from importing "..x": the job fails, the queue goes on
            self._finish(job, JobState.FAILED, error=f"cannot load {job.target}: {type(exc).__name__}: {exc}")
            return
        if spec.source is not None:
            self.master.call_soon(self.master.load_target, spec)
        handle = Walk.start(self.master, root, job.inputs, UnitRecorder(self.journal, job.id, resumed=job.tries > 1))
        job.handle = handle
        handle.future.add_done_callback(lambda _: self._on_done(job, handle))

    def _on_done(self, job: Job, handle: JobHandle) -> None:
        with self._lock:
            if job.state is not JobState.RUNNING or job.handle is not handle:
                return  # cancelled meanwhile
            future = handle.future
            error = concurrent.futures.CancelledError() if future.cancelled() else future.exception()
            if error is None:
                path = self.run_dir / "results" / f"{job.id}.json"
                try:
                    _write_result(future.result(), path)
                except (TypeError, ValueError, OSError) as exc:
                    self._finish(job, JobState.FAILED, error=f"cannot write the result: {exc}")
                else:
                    job.result_path = str(path)
                    self._finish(job, JobState.DONE)
            else:
                cause = error.__cause__
                text = cause.text if isinstance(cause, RemoteTraceback) else "".join(traceback.format_exception(error))
                self._finish(job, JobState.FAILED, error=f"{type(error).__name__}: {error}", trace=text)
            self._start_ready()

    def _finish(self, job: Job, state: JobState, error: str | None = None, trace: str | None = None) -> None:
        self._move(job, state, error, job.result_path)
        job.finished, job.error, job.traceback = time.time(), error, trace
        self.master.note(f"job {job.id} ({job.target}) {state}" + (f": {error}" if error else ""))
        self._check_ended()

    def _check_ended(self) -> None:
        if self._shutting_down and not any(job.state in ACTIVE for job in self.jobs.values()):
            self._ended.set()


def checked(target: str) -> tuple[targets.TargetSpec | None, str | None]:
    """Read *target* and have a child process import it first (:mod:`pydra.importcheck`): its spec, or why not.

    So a task file that exits, crashes or hangs at import costs its job, not
    the cluster (rank 0 imports it only once the child could).
    """
    try:
        spec = targets.read_target(target)
        importcheck.check_in_child(spec, setting("IMPORT_TIMEOUT"))
    except TargetError as exc:
        return None, str(exc)
    return spec, None


def _write_result(result: Any, path: Path) -> None:
    from pydra.batch import write_json

    write_json(result, path)


def run_service(run_dir: str | None, listen: tuple[str, int], max_jobs: int, first_job: list[str] | None) -> int:
    """Collective over MPI.COMM_WORLD: keep the cluster up, serving jobs, until an admin shuts it down.

    *first_job* (TARGET INPUT...) is queued at start, as if submitted.
    """
    import signal

    from mpi4py import MPI

    from pydra import cpus, journal as journals, rundirs
    from pydra._core.session import abort_on_uncaught_exit
    from pydra.comm import failures
    from pydra.control import ControlServer, configure_logging
    from pydra.executor import Executor
    from pydra.interrupts import RELAYED_STOP
    from pydra.launcher.allocation import refuse_foreign_world
    from pydra.strictmodes import StrictModeError

    comm = MPI.COMM_WORLD
    if refuse_foreign_world(comm):  # N copies of a one-rank cluster, each serving alone
        return 2
    abort_on_uncaught_exit(comm)
    cpus.share_cores(comm)  # before any job's TARGET loads numpy's OpenBLAS and the like
    if comm.rank != 0:
        # Ctrl-C in a terminal (and mpiexec's SIGTERM or SIGUSR2) reach every rank: rank 0 shuts the
        # cluster down in order; a worker ends when told to, or when rank 0 falls silent.
        for signum in (signal.SIGINT, signal.SIGTERM, RELAYED_STOP):
            signal.signal(signum, signal.SIG_IGN)
    with Executor(comm) as executor:
        if executor is None:
            return 0  # a worker: served rank 0 until it said stop
        master = executor.master
        directory = Path(run_dir) if run_dir else rundirs.new_run_dir("service")
        journal = journals.Journal.open(directory, create=True)
        service = Service(master, journal, directory, directory.name, max_jobs)
        configure_logging()  # the admin endpoint's audit trail, on rank 0's stderr
        server = ControlServer(service.handle, directory.name, listen)
        try:
            connection_file = server.start()
        except (OSError, StrictModeError) as exc:
            if isinstance(exc, StrictModeError):
                print(f"pydra serve: {exc}", file=sys.stderr)
            else:
                print(f"pydra serve: error: cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}", file=sys.stderr)
            service.shutdown(now=True)
            journal.close()
            return 2
        address = f"{server.address[0]}:{server.address[1]}" if server.address else "?"
        print(
            f"pydra: cluster {directory.name} of {comm.size} ranks serving on {address}\n"
            f"pydra: connection file {connection_file}; run directory {directory}\n"
            f"pydra: attach with `pydra shell`; stop with `pydra shell -c shutdown` (or Ctrl-C)",
            file=sys.stderr,
            flush=True,
        )
        # Ctrl-C or SIGTERM (SIGUSR2 from Open MPI's launcher): cancel what runs, then stop as `shutdown --now` does.
        for signum in (signal.SIGINT, signal.SIGTERM, RELAYED_STOP):
            signal.signal(signum, lambda signum, frame: service.shutdown(now=True))
        if first_job:
            try:
                service.submit(first_job[0], first_job[1:])
            except ServiceError as exc:
                print(f"pydra: error: {exc}", file=sys.stderr)
        service.wait()
        server.stop()
        journal.close()
        failed = service.status()["failed"]
        print(f"pydra: cluster {directory.name} shut down", file=sys.stderr, flush=True)
    if master.lost_ranks:
        failures.end_job_after_loss(comm, 0, master.stuck_ranks)
    return 1 if failed and first_job else 0
