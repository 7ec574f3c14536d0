"""Tests for pydra.journal: run directories, the job record, and units that survive kill -9."""

from __future__ import annotations

import os
import pickle
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pydra import journal
from pydra.errors import PydraError
from pydra.journal import Journal, JournalError
from pydra.rundirs import default_runs_dir, new_run_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def pydra_home(tmp_path, monkeypatch):
    """Keep every test away from the real ~/.pydra."""
    home = tmp_path / "pydra-home"
    monkeypatch.setenv("PYDRA_HOME", str(home))
    return home


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def opened(run_dir):
    with Journal.open(run_dir, create=True) as journal_:
        yield journal_


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- run directories ------------------------------------------------------------------------


def test_default_runs_dir_is_under_pydra_home(pydra_home):
    assert default_runs_dir() == pydra_home / "runs"


def test_new_run_dir_name_and_modes(pydra_home):
    before = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = new_run_dir("examples/pi.py:Pi")
    after = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    assert path.parent == pydra_home / "runs"
    match = re.fullmatch(r"(\d{8}-\d{6})-pi_Pi-([0-9a-f]{4})", path.name)
    assert match, path.name
    assert before <= match.group(1) <= after
    assert path.is_dir()
    # The directory and the parents it had to make are private.
    for directory in (path, pydra_home / "runs", pydra_home):
        assert mode(directory) == 0o700, directory


def test_new_run_dir_sanitizes_and_shortens_the_target(tmp_path):
    module = new_run_dir("package.module:Name", tmp_path)
    assert re.fullmatch(r"\d{8}-\d{6}-package\.module_Name-[0-9a-f]{4}", module.name)
    odd = new_run_dir("dir/we ird$näme;rm -rf.py:Task", tmp_path)
    stem = odd.name[len("YYYYmmdd-HHMMSS-"):-len("-abcd")]
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", stem), stem
    assert stem.startswith("we_ird_")
    long = new_run_dir("x" * 100 + ".py:Task", tmp_path)
    assert len(long.name[len("YYYYmmdd-HHMMSS-"):-len("-abcd")]) == 40
    assert new_run_dir("::", tmp_path).name.split("-")[2]  # nothing usable still gives a name


def test_new_run_dir_never_reuses_a_directory(tmp_path):
    paths = {new_run_dir("t.py:T", tmp_path) for _ in range(50)}
    assert len(paths) == 50


# --- opening ----------------------------------------------------------------------------------


def test_journal_error_is_a_pydra_error():
    assert issubclass(JournalError, PydraError)


def test_create_makes_private_directory_and_files(run_dir):
    with Journal.open(run_dir / "deeper", create=True) as journal_:
        journal_.add_job("t.py:T", [], {}, None)
        files = sorted(p.name for p in (run_dir / "deeper").iterdir())
        assert files == ["journal.sqlite", "journal.sqlite-shm", "journal.sqlite-wal", "lock"]
        for name in files:
            assert mode(run_dir / "deeper" / name) == 0o600, name
    assert mode(run_dir) == 0o700
    assert mode(run_dir / "deeper") == 0o700


def test_a_run_directory_is_used_by_one_run_at_a_time(run_dir):
    """A second run on the same directory is refused in one line (it redid the work and died in tracebacks)."""
    with Journal.open(run_dir, create=True) as first:
        first.add_job("t.py:T", [], {}, None)
        with pytest.raises(JournalError, match=rf"^{run_dir} is in use by another run \(pid {os.getpid()}\): let it end"):
            Journal.open(run_dir, create=False)
    with Journal.open(run_dir, create=False):  # let go once closed
        pass


def test_a_run_directory_is_let_go_when_its_holder_dies(run_dir):
    """The kernel drops the lock of a killed rank 0: resuming after it is not refused."""
    Journal.open(run_dir, create=True).close()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pydra.journal import Journal; Journal.open(Path(sys.argv[1]), create=False); "
                               "print('held', flush=True); time.sleep(60)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(JournalError, match="is in use by another run"):
            Journal.open(run_dir, create=False)
    finally:
        holder.kill()
        holder.wait()
    Journal.open(run_dir, create=False).close()


def test_journal_uses_wal_and_records_its_schema_version(opened, run_dir):
    db = sqlite3.connect(run_dir / "journal.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == journal.SCHEMA_VERSION == 1
    finally:
        db.close()


def test_resume_without_journal_says_what_was_expected(run_dir):
    run_dir.mkdir()
    with pytest.raises(JournalError) as caught:
        Journal.open(run_dir, create=False)
    assert str(caught.value) == (
        f"no journal in {run_dir}: expected {run_dir / 'journal.sqlite'} (was it made with --run-dir?)"
    )
    assert not (run_dir / "journal.sqlite").exists()  # resuming creates nothing


def test_resume_from_a_directory_that_is_not_there_says_so(tmp_path):
    with pytest.raises(JournalError) as caught:
        Journal.open(tmp_path / "gone", create=False)
    assert str(caught.value) == f"no run directory {tmp_path / 'gone'}: give the directory a run printed at its start"
    assert not (tmp_path / "gone").exists()


def test_create_refuses_a_journal_that_has_jobs(run_dir):
    with Journal.open(run_dir, create=True) as journal_:
        journal_.add_job("t.py:T", [], {}, None)
    with pytest.raises(JournalError, match="already holds a journal"):
        Journal.open(run_dir, create=True)


def test_create_reuses_a_journal_without_jobs(run_dir):
    Journal.open(run_dir, create=True).close()
    with Journal.open(run_dir, create=True) as journal_:
        assert journal_.add_job("t.py:T", [], {}, None) == 1


def test_schema_version_mismatch_is_refused(run_dir):
    Journal.open(run_dir, create=True).close()
    db = sqlite3.connect(run_dir / "journal.sqlite")
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(JournalError, match="schema version 7: expected 1"):
        Journal.open(run_dir, create=False)


def test_files_that_are_not_journals_are_refused(run_dir):
    run_dir.mkdir()
    (run_dir / "journal.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(JournalError, match="cannot open the journal"):
        Journal.open(run_dir, create=False)
    (run_dir / "journal.sqlite").unlink()
    db = sqlite3.connect(run_dir / "journal.sqlite")
    db.execute("CREATE TABLE other (x)")
    db.close()
    with pytest.raises(JournalError, match="not a pydra journal"):
        Journal.open(run_dir, create=True)
    with pytest.raises(JournalError, match="not a pydra journal"):
        Journal.open(run_dir, create=False)


# --- jobs -------------------------------------------------------------------------------------


def test_job_lifecycle_and_transitions(opened):
    job = opened.add_job("t.py:T", ["in1", "in2"], {"retries": 2, "name": "x"}, "ab" * 32, priority=3)
    record = opened.job(job)
    assert record["state"] == "queued"
    assert record["inputs"] == ["in1", "in2"]
    assert record["options"] == {"retries": 2, "name": "x"}
    assert record["source_sha256"] == "ab" * 32
    assert record["priority"] == 3
    assert record["started"] is None and record["finished"] is None

    opened.set_state(job, "running")
    running = opened.job(job)
    assert running["state"] == "running"
    assert running["started"] >= record["submitted"]
    assert running["finished"] is None

    opened.set_state(job, "done", result_path="/results/out.pickle")
    done = opened.job(job)
    assert done["state"] == "done"
    assert done["finished"] >= done["started"]
    assert done["result_path"] == "/results/out.pickle"
    assert done["error"] is None

    states = opened.transitions(job)
    assert [state for state, _ in states] == ["queued", "running", "done"]
    times = [at for _, at in states]
    assert times == sorted(times)
    assert times[0] == record["submitted"]


def test_failed_job_keeps_its_error_until_it_runs_again(opened):
    job = opened.add_job("t.py:T", [], {}, None)
    opened.set_state(job, "running")
    opened.set_state(job, "failed", error="ValueError: bad input")
    failed = opened.job(job)
    assert failed["error"] == "ValueError: bad input"
    assert failed["finished"] is not None
    opened.set_state(job, "running")  # resumed
    again = opened.job(job)
    assert again["error"] is None and again["finished"] is None


def test_jobs_are_listed_newest_first(opened):
    ids = [opened.add_job(f"t{n}.py:T", [], {}, None) for n in range(3)]
    assert [job["id"] for job in opened.jobs()] == ids[::-1]
    assert opened.job(999) is None
    assert opened.transitions(999) == []


def test_bad_states_and_unknown_jobs_are_the_callers_mistake(opened):
    job = opened.add_job("t.py:T", [], {}, None)
    with pytest.raises(ValueError, match="unknown job state 'finished'"):
        opened.set_state(job, "finished")
    with pytest.raises(KeyError, match="no job 42"):
        opened.set_state(42, "running")
    # ... and do not break the journal.
    assert opened.failed is None
    opened.set_state(job, "cancelled")
    assert opened.job(job)["state"] == "cancelled"
    assert opened.transitions(42) == []


# --- units ------------------------------------------------------------------------------------


def test_units_round_trip(run_dir):
    with Journal.open(run_dir, create=True) as journal_:
        job = journal_.add_job("t.py:T", [], {}, None)
        journal_.record_unit(job, "0.1[3]", 10, 5, pickle.dumps(list(range(10, 15))), 2, 0.25)
        journal_.record_unit(job, "0.1[3]", 0, 10, pickle.dumps(list(range(10))), 1, 0.5)
        journal_.record_unit(job, "0", 0, 1, pickle.dumps("root"), 1, 0.1)
        journal_.record_unit(job + 1, "0", 0, 1, b"another job", 1, 0.1)
        units = journal_.units(job, "0.1[3]")  # no flush: units() commits what is queued
        assert {start: (count, pickle.loads(blob)) for start, (count, blob) in units.items()} == {
            0: (10, list(range(10))),
            10: (5, list(range(10, 15))),
        }
        assert journal_.unit_rows(job) == [("0", 0, 1), ("0.1[3]", 0, 10), ("0.1[3]", 10, 5)]
        assert journal_.units(job, "9") == {}
    with Journal.open(run_dir, create=False) as resumed:
        assert resumed.unit_rows(job) == [("0", 0, 1), ("0.1[3]", 0, 10), ("0.1[3]", 10, 5)]
        assert resumed.units(job, "0") == {0: (1, pickle.dumps("root"))}
        assert resumed.job(job)["target"] == "t.py:T"


def test_a_unit_recorded_twice_keeps_its_first_result(opened):
    job = opened.add_job("t.py:T", [], {}, None)
    opened.record_unit(job, "0", 0, 4, b"first", 1, 0.1)
    opened.record_unit(job, "0", 0, 4, b"second, same batch", 2, 0.1)
    opened.flush()
    opened.record_unit(job, "0", 0, 4, b"third, later batch", 3, 0.1)
    opened.flush()
    assert opened.units(job, "0") == {0: (4, b"first")}


def test_record_unit_accepts_buffers_and_refuses_objects(opened):
    job = opened.add_job("t.py:T", [], {}, None)
    buffer = bytearray(b"pickled")
    opened.record_unit(job, "0", 0, 1, buffer, 1, 0.1)
    buffer[:] = b"changed"  # the caller may reuse its buffer at once
    opened.record_unit(job, "0", 1, 1, memoryview(b"view"), 1, 0.1)
    with pytest.raises(TypeError, match="expected bytes"):
        opened.record_unit(job, "0", 2, 1, ["not", "pickled"], 1, 0.1)
    assert opened.units(job, "0") == {0: (1, b"pickled"), 1: (1, b"view")}


def test_record_unit_does_not_write_synchronously(run_dir):
    with Journal.open(run_dir, create=True, flush_interval=60) as journal_:
        job = journal_.add_job("t.py:T", [], {}, None)
        commits = journal_.statistics()["commits"]
        for start in range(10):
            journal_.record_unit(job, "0", start, 1, b"r", 1, 0.0)
        time.sleep(0.05)
        statistics = journal_.statistics()
        assert statistics["commits"] == commits
        assert statistics["rows_waiting"] == 10
        assert statistics["rows_committed"] == 0
        journal_.flush()
        statistics = journal_.statistics()
        assert statistics["commits"] == commits + 1
        assert (statistics["rows_waiting"], statistics["rows_committed"]) == (0, 10)


def test_rows_are_committed_within_the_flush_interval(run_dir):
    with Journal.open(run_dir, create=True, flush_interval=0.02) as journal_:
        job = journal_.add_job("t.py:T", [], {}, None)
        journal_.record_unit(job, "0", 0, 1, b"r", 1, 0.0)
        deadline = time.monotonic() + 5
        while journal_.statistics()["rows_committed"] < 1:
            assert time.monotonic() < deadline, "the row was never committed without a flush"
            time.sleep(0.005)
        # Seen by an independent reader, not only counted.
        db = sqlite3.connect(run_dir / "journal.sqlite")
        try:
            assert db.execute("SELECT count(*) FROM units").fetchone()[0] == 1
        finally:
            db.close()


def test_batching_commits_many_rows_at_once(run_dir):
    rows = 5000
    # A 1 s interval keeps a slow machine from turning the test into one of timing.
    with Journal.open(run_dir, create=True, flush_interval=1.0) as journal_:
        job = journal_.add_job("t.py:T", [], {}, None)
        commits = journal_.statistics()["commits"]
        for start in range(rows):
            journal_.record_unit(job, "0.2", start, 1, pickle.dumps(start), start % 7, 0.001)
        journal_.flush()
        statistics = journal_.statistics()
        assert statistics["rows_committed"] == rows
        assert statistics["rows_waiting"] == 0
        assert statistics["commits"] - commits <= rows // 100, statistics
        assert statistics["commit_seconds"] > 0
        units = journal_.units(job, "0.2")
        assert len(units) == rows
        assert all(pickle.loads(blob) == start for start, (_, blob) in units.items())


def test_a_full_batch_is_committed_without_waiting_for_the_interval(run_dir):
    with Journal.open(run_dir, create=True, flush_interval=60) as journal_:
        job = journal_.add_job("t.py:T", [], {}, None)
        for start in range(journal.BATCH_ROWS - 1):
            journal_.record_unit(job, "0", start, 1, b"r", 1, 0.0)
        time.sleep(0.2)
        assert journal_.statistics()["rows_committed"] == 0  # not yet a batch, and 60 s to go
        journal_.record_unit(job, "0", journal.BATCH_ROWS, 1, b"r", 1, 0.0)
        # Without any flush (and a 60 s interval) the full batch gets committed.
        deadline = time.monotonic() + 5
        while journal_.statistics()["rows_committed"] < journal.BATCH_ROWS:
            assert time.monotonic() < deadline, journal_.statistics()
            time.sleep(0.005)


def test_flushed_units_survive_kill_9(run_dir):
    rows = 2000
    script = textwrap.dedent(
        f"""
        import os, pickle, sys
        from pathlib import Path
        from pydra.journal import Journal
        journal = Journal.open(Path({str(run_dir)!r}), create=True)
        job = journal.add_job("t.py:T", ["input"], {{}}, None)
        journal.set_state(job, "running")
        for start in range({rows}):
            journal.record_unit(job, "0.1", start, 1, pickle.dumps(start * start), 1, 0.001)
        journal.flush()
        print("flushed", flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert finished.returncode == -9, finished.stderr
    assert finished.stdout == "flushed\n"
    assert (run_dir / "journal.sqlite-wal").exists()  # nobody checkpointed: recovery reads the WAL
    with Journal.open(run_dir, create=False) as resumed:
        assert resumed.job(1)["state"] == "running"
        units = resumed.units(1, "0.1")
        assert len(units) == rows
        assert all(pickle.loads(blob) == start * start for start, (_, blob) in units.items())


def test_a_full_disk_stops_writing_and_keeps_what_was_committed(run_dir):
    journal_ = Journal.open(run_dir, create=True)
    job = journal_.add_job("t.py:T", [], {}, None)
    for start in range(100):
        journal_.record_unit(job, "0", start, 1, b"small", 1, 0.0)
    journal_.flush()
    # Test hook: cap the database a few pages above its size, as a full disk would.
    pages = journal_._call(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
    journal_._call(lambda db: db.execute(f"PRAGMA max_page_count = {pages + 3}"))
    for start in range(100, 200):
        journal_.record_unit(job, "0", start, 1, os.urandom(4096), 1, 0.0)

    with pytest.raises(JournalError) as caught:
        journal_.flush()
    assert str(caught.value).startswith(f"cannot write the journal in {run_dir}: ")
    assert "full" in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert journal_.failed is caught.value.__cause__

    # Every later write says so too, chaining the same original error.
    for write in (
        lambda: journal_.record_unit(job, "0", 500, 1, b"x", 1, 0.0),
        journal_.flush,
        lambda: journal_.set_state(job, "failed"),
        lambda: journal_.add_job("t.py:T", [], {}, None),
    ):
        with pytest.raises(JournalError, match="cannot write the journal") as again:
            write()
        assert again.value.__cause__ is journal_.failed

    # The failed batch rolled back whole; what was committed before stays readable.
    assert journal_.unit_rows(job) == [("0", start, 1) for start in range(100)]
    assert journal_.statistics()["rows_committed"] == 100
    with pytest.raises(JournalError, match="cannot write the journal"):
        journal_.close()
    with Journal.open(run_dir, create=False) as resumed:
        assert len(resumed.units(job, "0")) == 100
        assert resumed.job(job)["state"] == "queued"


def test_writes_after_close_are_refused(run_dir):
    journal_ = Journal.open(run_dir, create=True)
    job = journal_.add_job("t.py:T", [], {}, None)
    journal_.record_unit(job, "0", 0, 1, b"r", 1, 0.0)
    journal_.close()  # commits the queued row
    journal_.close()  # twice is harmless
    with pytest.raises(JournalError, match="is closed"):
        journal_.record_unit(job, "0", 1, 1, b"r", 1, 0.0)
    with pytest.raises(JournalError, match="is closed"):
        journal_.flush()
    with Journal.open(run_dir, create=False) as resumed:
        assert resumed.unit_rows(job) == [("0", 0, 1)]


def test_context_manager_closes_and_stops_the_writer(run_dir):
    with Journal.open(run_dir, create=True) as journal_:
        thread = journal_._thread
        assert thread.is_alive()
    assert not thread.is_alive()
