"""Rank 0's durable record of a run, so a killed job resumes without redoing finished work.

A *run directory* holds one SQLite file, ``journal.sqlite``, with three tables:

* ``jobs``: what was asked (target, inputs, options, the source's hash) and
  what became of it (state, times, result path, error);
* ``transitions``: every state a job went through, with its time;
* ``units``: one row per completed work unit, the pickled results of items
  ``[start, start + count)`` of one node of the task tree.

A job killed with ``kill -9`` is resumed by reopening its journal
(``Journal.open(run_dir, create=False)``) and recomputing only the units that
have no row; the jobs table is also the history of the runs.

The scheduling loop records units without ever waiting for the disk:
:meth:`Journal.record_unit` only queues the row, and a single writer thread
(``pydra-journal``) commits queued rows in batches. Every other write (new
jobs, state changes) goes through the same thread, in order, so a job marked
"done" has all its units committed before the mark. The database runs in WAL
mode with ``synchronous=NORMAL``: a committed transaction survives the death
of the process (a power loss may lose the last few).
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydra.errors import PydraError
from pydra.jobstates import INITIAL, JobState, as_state, check_move
from pydra.rundirs import claim, holder, make_private_dirs

__all__ = [
    "BATCH_ROWS",
    "JOURNAL_NAME",
    "SCHEMA_VERSION",
    "STATES",
    "Journal",
    "JournalError",
]

JOURNAL_NAME = "journal.sqlite"  #: the journal's file name inside a run directory
SCHEMA_VERSION = 1  #: stored as PRAGMA user_version; bump it when the tables change
BATCH_ROWS = 1000  #: the writer commits as soon as this many unit rows wait
STATES = tuple(state.value for state in JobState)  #: the states of a job (their moves: pydra.jobstates)

_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    inputs TEXT NOT NULL,
    options TEXT NOT NULL,
    source_sha256 TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    result_path TEXT,
    error TEXT
);
CREATE TABLE transitions (
    job INTEGER NOT NULL REFERENCES jobs(id),
    state TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX transitions_by_job ON transitions (job);
CREATE TABLE units (
    job INTEGER NOT NULL,
    node TEXT NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    result BLOB NOT NULL,
    rank INTEGER,
    seconds REAL,
    recorded REAL NOT NULL,
    PRIMARY KEY (job, node, start)
);
"""

_JOB_COLUMNS = (
    "id", "target", "inputs", "options", "source_sha256", "priority", "state",
    "submitted", "started", "finished", "result_path", "error",
)


class JournalError(PydraError):
    """The journal cannot be opened, or can no longer be written."""


class _Request:
    """A write run by the writer thread for a caller that waits for its outcome."""

    __slots__ = ("work", "stop", "done", "result", "error")

    def __init__(self, work: Callable[[sqlite3.Connection], Any] | None, stop: bool = False) -> None:
        self.work = work  # None: only commit what is queued before it (a flush)
        self.stop = stop
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Journal:
    """The journal of one run directory; open it with :meth:`Journal.open`.

    Methods may be called from any thread. Writes are performed by the
    journal's writer thread; reads use a second connection behind a lock.
    """

    def __init__(self, run_dir: Path, reader: sqlite3.Connection, writer: sqlite3.Connection,
                 flush_interval: float, claimed: int) -> None:
        """Use :meth:`Journal.open`; this takes connections already checked and configured, and the claim."""
        self.run_dir = run_dir
        self._claimed = claimed  # the run directory's lock (pydra.rundirs.claim), let go on close
        self.path = run_dir / JOURNAL_NAME
        self.flush_interval = flush_interval
        self._reader = reader
        self._read_lock = threading.Lock()
        self._writer = writer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # requests (writes callers wait for)
        # Unit rows wait in a plain list: handing each row to a queue would wake the writer
        # thread once per row, and those GIL hand-offs would slow the scheduler that records them.
        self._rows: list[tuple] = []
        self._wake = threading.Event()
        # Guards _rows, _failed, _closed and _submitted: a request is queued only while the
        # writer has not failed, so the writer's final drain answers every request.
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self._closed = False
        self._submitted = 0  # unit rows handed to record_unit
        self._committed = 0  # unit rows in committed batches (duplicates included)
        self._commits = 0
        self._commit_seconds = 0.0
        self._thread = threading.Thread(target=self._write_loop, name="pydra-journal", daemon=True)
        self._thread.start()

    # -- opening and closing ------------------------------------------------------------------

    @classmethod
    def open(cls, run_dir: Path, create: bool, flush_interval: float = 0.02) -> Journal:
        """Open the journal of *run_dir*: a new one if *create*, else an existing one to resume.

        With *create*, *run_dir* is created (mode 0o700) if missing and must not
        hold a journal that already has a job. Without it, the journal must
        exist. Queued unit rows are committed at the latest *flush_interval*
        seconds after the first of them was recorded.
        """
        run_dir = Path(run_dir)
        path = run_dir / JOURNAL_NAME
        if flush_interval < 0:
            raise ValueError(f"flush_interval: expected seconds >= 0, got {flush_interval}")
        if create:
            make_private_dirs(run_dir)
            try:
                # Made here, so that the database starts private whatever the umask;
                # SQLite gives its -wal and -shm files the database file's mode.
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # checked below: an empty journal (no job yet) may be reused
            else:
                os.fchmod(descriptor, 0o600)
                os.close(descriptor)
        elif not Path(run_dir).is_dir():
            raise JournalError(f"no run directory {run_dir}: give the directory a run printed at its start")
        elif not path.is_file():
            raise JournalError(f"no journal in {run_dir}: expected {path} (was it made with --run-dir?)")
        try:
            claimed = claim(run_dir)
        except OSError as exc:
            raise JournalError(f"cannot lock the run directory {run_dir}: {exc.strerror or exc}") from exc
        if claimed is None:
            raise JournalError(f"{run_dir} is in use by another run ({holder(run_dir)}): let it end, "
                               "or give another run directory")
        reader = writer = None
        try:
            reader = _connect(path)
            _prepare(reader, path, create)
            if create and reader.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is not None:
                raise JournalError(f"{run_dir} already holds a journal with jobs: resume it, or use a new run directory")
            writer = _connect(path)
        except BaseException as exc:
            for connection in (reader, writer):
                if connection is not None:
                    connection.close()
            os.close(claimed)
            if isinstance(exc, sqlite3.Error):  # not a database, unreadable, locked...
                raise JournalError(f"cannot open the journal {path}: {exc}") from exc
            raise
        return cls(run_dir, reader, writer, flush_interval, claimed)

    def close(self) -> None:
        """Commit everything recorded, stop the writer thread and close the database.

        Raises :class:`JournalError` if rows could not be written (after closing
        all the same). Closing twice does nothing.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            request = _Request(None, stop=True)
            if self._failed is None:
                self._queue.put(request)
                self._wake.set()
        self._thread.join()
        with self._read_lock:
            self._reader.close()
        os.close(self._claimed)
        if self._failed is not None:
            raise self._write_error()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            self.close()
        except JournalError:
            if exc_type is None:
                raise
            # The exception on its way out already says what went wrong first.

    # -- jobs ------------------------------------------------------------------------------------

    def add_job(self, target: str, inputs: list[str], options: dict, source_sha256: str | None,
                priority: int = 0) -> int:
        """Record a new job in state "queued" (:data:`~pydra.jobstates.INITIAL`) and return its id."""
        inputs_json = json.dumps(list(inputs))
        options_json = json.dumps(options, sort_keys=True)
        now = time.time()

        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO jobs (target, inputs, options, source_sha256, priority, state, submitted)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (target, inputs_json, options_json, source_sha256, priority, INITIAL.value, now),
            )
            db.execute("INSERT INTO transitions VALUES (?, ?, ?)", (cursor.lastrowid, INITIAL.value, now))
            return cursor.lastrowid

        return self._call(insert)

    def set_state(self, job: int, state: JobState | str, error: str | None = None,
                  result_path: str | None = None) -> None:
        """Move *job* to *state* and record the transition.

        A move not in :data:`pydra.jobstates.TRANSITIONS` from the state the
        journal holds raises :class:`~pydra.jobstates.JobStateError` and writes
        nothing. "running" sets the start time (and clears a previous finish
        time and error: a resumed job runs again); "done", "failed" and
        "cancelled" set the finish time. *error* and *result_path* are stored when given.
        """
        state = as_state(state)  # an unknown state is refused before anything is queued
        now = time.time()

        def update(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job} in {self.path}")
            check_move(row[0], state, job)  # in the transaction: no other writer can move it meanwhile
            if state is JobState.RUNNING:
                sets = "state = ?, started = ?, finished = NULL, error = NULL"
                values: list = [state.value, now]
            elif state.final:
                sets, values = "state = ?, finished = ?", [state.value, now]
            else:
                sets, values = "state = ?", [state.value]
            if error is not None:
                sets += ", error = ?"
                values.append(error)
            if result_path is not None:
                sets += ", result_path = ?"
                values.append(str(result_path))
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*values, job])
            db.execute("INSERT INTO transitions VALUES (?, ?, ?)", (job, state.value, now))

        self._call(update)

    def set_priority(self, job: int, priority: int) -> None:
        """Change the priority of *job* (the queue runs higher priorities first)."""

        def update(db: sqlite3.Connection) -> None:
            if db.execute("UPDATE jobs SET priority = ? WHERE id = ?", (priority, job)).rowcount == 0:
                raise KeyError(f"no job {job} in {self.path}")

        self._call(update)

    def job(self, job_id: int) -> dict | None:
        """Return job *job_id* as a dict of its columns (inputs and options decoded), or None."""
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return _job_dict(rows[0]) if rows else None

    def jobs(self) -> list[dict]:
        """Return every job, newest first, as :meth:`job` does."""
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs ORDER BY id DESC")
        return [_job_dict(row) for row in rows]

    def transitions(self, job: int) -> list[tuple[str, float]]:
        """Return the (state, time) transitions of *job*, oldest first."""
        return self._read("SELECT state, at FROM transitions WHERE job = ? ORDER BY rowid", (job,))

    # -- units ---------------------------------------------------------------------------------

    def record_unit(self, job: int, node: str, start: int, count: int, result: bytes, rank: int,
                    seconds: float) -> None:
        """Queue the row of a completed unit: *result* holds items [start, start + count) of *node*.

        Returns at once; the writer thread commits the row soon after (see
        :meth:`flush`). A unit recorded twice keeps its first result. *result*
        is the already-pickled bytes of the unit's results.
        """
        if type(result) is not bytes:
            if not isinstance(result, (bytearray, memoryview)):
                raise TypeError(f"result: expected bytes (the pickled results), got {type(result).__name__}")
            result = bytes(result)  # a copy: the caller may reuse its buffer before the commit
        row = (job, node, start, count, result, rank, seconds, time.time())
        with self._lock:
            self._check_writable()
            self._submitted += 1
            self._rows.append(row)
            if len(self._rows) == BATCH_ROWS:
                self._wake.set()

    def flush(self) -> None:
        """Block until every row recorded so far is committed."""
        self._call(None)

    def units(self, job: int, node: str) -> dict[int, tuple[int, bytes]]:
        """Return ``{start: (count, result)}`` for the committed units of *node* of *job*.

        Rows still queued are committed first, unless the journal can no longer
        be written: then this returns what the database holds.
        """
        self._flush_if_writable()
        rows = self._read("SELECT start, count, result FROM units WHERE job = ? AND node = ?", (job, node))
        return {start: (count, result) for start, count, result in rows}

    def unit_rows(self, job: int) -> list[tuple[str, int, int]]:
        """Return the (node, start, count) of every committed unit of *job*, by node then start."""
        self._flush_if_writable()
        return self._read("SELECT node, start, count FROM units WHERE job = ? ORDER BY node, start", (job,))

    # -- state --------------------------------------------------------------------------------

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the writer thread, or None while the journal can be written."""
        return self._failed

    def statistics(self) -> dict:
        """Return counters of the writer: rows committed and waiting, commits, seconds committing."""
        with self._lock:
            submitted, committed = self._submitted, self._committed
        return {
            "rows_committed": committed,
            "rows_waiting": submitted - committed,
            "commits": self._commits,
            "commit_seconds": self._commit_seconds,
        }

    # -- internals: callers' side ----------------------------------------------------------------

    def _write_error(self) -> JournalError:
        error = JournalError(f"cannot write the journal in {self.run_dir}: {self._failed}")
        error.__cause__ = self._failed
        return error

    def _check_writable(self) -> None:
        # Called with self._lock held.
        if self._failed is not None:
            raise self._write_error()
        if self._closed:
            raise JournalError(f"the journal in {self.run_dir} is closed")

    def _call(self, work: Callable[[sqlite3.Connection], Any] | None) -> Any:
        """Run *work* in the writer thread after the rows queued before it; return its result."""
        request = _Request(work)
        with self._lock:
            self._check_writable()
            self._queue.put(request)
            self._wake.set()
        request.done.wait()
        if request.error is not None:
            if request.error is self._failed:
                raise self._write_error()
            raise request.error
        return request.result

    def _flush_if_writable(self) -> None:
        try:
            self.flush()
        except JournalError:
            if self._failed is None:
                raise  # closed: reading is no longer possible either

    def _read(self, sql: str, parameters: tuple = ()) -> list:
        with self._read_lock:
            try:
                return self._reader.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:  # closed, or the file itself is failing
                raise JournalError(f"cannot read the journal in {self.run_dir}: {exc}") from exc

    # -- internals: the writer thread ------------------------------------------------------------

    def _write_loop(self) -> None:
        db = self._writer
        message: Any = None
        try:
            while True:
                # Wake every flush_interval, or at once for BATCH_ROWS rows or a request.
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                self._commit_waiting_rows(db)
                while True:
                    try:
                        message = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._commit_waiting_rows(db)  # the rows recorded before the request go first
                    if message.work is not None:
                        self._run(db, message)
                    message.done.set()
                    if message.stop:
                        return
                message = None
        except BaseException as exc:  # noqa: BLE001 - any failure ends writing, and is reported
            self._fail(exc, message)
        finally:
            db.close()

    def _commit_waiting_rows(self, db: sqlite3.Connection) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
        if rows:
            self._commit_rows(db, rows)

    def _commit_rows(self, db: sqlite3.Connection, batch: list[tuple]) -> None:
        began = time.perf_counter()
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._commit_seconds += time.perf_counter() - began
        self._commits += 1
        with self._lock:
            self._committed += len(batch)
        batch.clear()

    def _run(self, db: sqlite3.Connection, request: _Request) -> None:
        began = time.perf_counter()
        try:
            db.execute("BEGIN")
            request.result = request.work(db)
            db.execute("COMMIT")
        except sqlite3.Error:
            _rollback(db)
            raise  # the database failed: the writer stops
        except Exception as exc:
            _rollback(db)
            request.error = exc  # the caller's mistake (an unknown job): only the caller hears of it
            return
        self._commit_seconds += time.perf_counter() - began
        self._commits += 1

    def _fail(self, exc: BaseException, current: Any) -> None:
        with self._lock:
            self._failed = exc
        # Nothing can be queued any more: answer the request being served, if any,
        # and every request still waiting.
        if isinstance(current, _Request) and not current.done.is_set():
            current.error = exc
            current.done.set()
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return
            message.error = exc
            message.done.set()


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode (isolation_level=None): transactions are begun and committed explicitly.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        db.execute("PRAGMA synchronous = NORMAL")  # in WAL mode, commits still survive kill -9
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, path: Path, create: bool) -> None:
    """Check the schema version of *path*, creating the tables in a new database if *create*."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and create:
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise JournalError(f"{path} is an SQLite database but not a pydra journal")
        _use_wal(db, path)
        db.execute("BEGIN")  # all tables or none (executescript would commit at once)
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return
    if version == 0:
        raise JournalError(f"{path} is not a pydra journal: expected schema version {SCHEMA_VERSION}, found none")
    if version != SCHEMA_VERSION:
        raise JournalError(f"{path} has journal schema version {version}: expected {SCHEMA_VERSION}")
    _use_wal(db, path)


def _use_wal(db: sqlite3.Connection, path: Path) -> None:
    # WAL lets the reader read while the writer commits; the mode is stored in the file.
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise JournalError(f"cannot use WAL mode for {path}: got journal_mode {mode}")


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite may already have rolled back (disk full); the original error matters


def _job_dict(row: tuple) -> dict:
    job = dict(zip(_JOB_COLUMNS, row))
    job["inputs"] = json.loads(job["inputs"])
    job["options"] = json.loads(job["options"])
    return job


class UnitRecorder:
    """One job's record of finished units, as the tree walk uses it (a ``UnitLog``).

    Finished units go to *journal* as they arrive; a *resumed* job first reads
    the units of its earlier run, once, not once per tree node.
    """

    def __init__(self, journal: Journal, job: int, resumed: bool) -> None:
        self.journal, self.job = journal, job
        self._earlier: dict[str, dict[int, tuple[int, bytes]]] = {}
        if resumed:
            for node in {node for node, _, _ in journal.unit_rows(job)}:
                self._earlier[node] = journal.units(job, node)

    def units_recorded(self) -> int:
        """How many units the earlier run left."""
        return sum(len(units) for units in self._earlier.values())

    def done(self, node: str) -> dict[int, tuple[int, bytes]]:
        return self._earlier.get(node, {})

    def record(self, node: str, start: int, count: int, blob: bytes, rank: int, seconds: float) -> None:
        try:
            self.journal.record_unit(self.job, node, start, count, blob, rank, seconds)
        except JournalError as exc:  # the disk is full, or failing
            raise JournalError(
                f"job {self.job}: items {start}..{start + count - 1} of node {node} from rank {rank} not journaled: {exc}"
            ) from exc
