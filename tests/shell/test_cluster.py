"""A service cluster end to end: ``pydra serve -n 4`` driven only through ``pydra shell -c``.

One 4-rank cluster (``--max-jobs 1``, so the order jobs run in is
observable) serves the whole module. The tests show that the shell reports
the cluster's health (``status``, ``workers``, ``--json`` everywhere); that
the queue runs jobs by priority and that ``priority`` reorders it; that
``cancel`` stops a running job and keeps a queued one from ever starting;
that ``retry`` runs a failed job again; that unknown keys, launch-only keys
and bad command lines are refused with the documented exit statuses; that
``drain``, ``restart`` and ``config`` change the running cluster; and, last,
that ``shutdown`` ends mpiexec cleanly, removes the connection file and
leaves every job's final state in the run directory's journal.

Three tests pin down bugs found this way (now fixed): a traceback on rank 0
for every cancelled running job, a drained worker missing from ``status``,
and a graceful ``shutdown`` that never ended while a job was still queued
(that one starts a cluster of its own).

Every subprocess has a timeout; the cluster runs in a session of its own
and is stopped in the fixture's teardown (``shutdown --now``, then its
process group), never by name.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from clusterkit import (
    FAILS_FIRST_TIME,
    FINAL,
    HERE,
    IMPORT_TIMEOUT,
    JOB_TIMEOUT,
    NAPS,
    SHELL_TIMEOUT,
    SPINS,
    SQUARES,
    WORKER_KEYS,
    Cluster,
    keygen,
    pydra,
    result_of,
    serving,
    wait_until,
)
from testkit import stop_group

from pydra.control import newest_connection_file

# -- health --------------------------------------------------------------------------------------


def test_status_and_workers_describe_four_ranks_and_every_reply_has_a_json_form(cluster: Cluster,
                                                                                 monkeypatch) -> None:
    details = json.loads(cluster.connection_file.read_text())
    assert cluster.connection_file.parent == cluster.home / "run"
    assert stat.S_IMODE(cluster.connection_file.stat().st_mode) == 0o600
    assert details["cluster"] == cluster.run_dir.name and details["port"] > 0 and details["host_key"].startswith("SHA256:")
    monkeypatch.setenv("PYDRA_HOME", str(cluster.home))
    assert newest_connection_file() == cluster.connection_file  # its rank 0 runs: the shell's choice

    status = cluster.call("status")
    assert status["ranks"] == 4
    assert status["cluster"] == cluster.run_dir.name and status["run_dir"] == str(cluster.run_dir)
    assert sum(status["workers"].values()) == 3, status["workers"]
    assert status["paused"] is False and status["shutting_down"] is False
    assert status["hosts"] and all(isinstance(host, str) and host for host in status["hosts"])
    assert re.search(r"^ranks\s+4 on ", cluster.ok("status"), re.M)

    workers = cluster.call("workers")
    assert [worker["rank"] for worker in workers] == [1, 2, 3]
    for worker in workers:
        assert WORKER_KEYS <= set(worker), worker
        assert isinstance(worker["host"], str) and worker["host"]
        assert worker["state"] in ("idle", "busy"), worker
        assert isinstance(worker["heartbeat_age"], float) and worker["heartbeat_age"] >= 0
        assert worker["cpu_percent"] is None or worker["cpu_percent"] >= 0
        assert worker["memory_bytes"] is None or worker["memory_bytes"] > 0
        assert worker["threads"] is None or worker["threads"] > 0
    table = cluster.ok("workers").splitlines()
    assert table[0].split()[:3] == ["RANK", "HOST", "STATE"] and len(table) == 4

    settings = cluster.call("config")
    assert settings["max_jobs"] == 1 and set(settings) == {"max_jobs", "heartbeat_timeout", "batch_seconds", "retries"}
    if settings["heartbeat_timeout"] is not None:  # heartbeats carry the workers' usage
        rows = wait_until("every worker reporting its memory", lambda: cluster.call("workers"),
                          lambda rows: all(row["memory_bytes"] for row in rows), timeout=20)
        # Its main thread and its heartbeat thread at least: the kernel's count, not Python's.
        assert all(row["threads"] >= 2 for row in rows), rows

    assert isinstance(cluster.call("queue"), list)
    assert isinstance(cluster.call("jobs"), list)
    job_id = cluster.submit(SQUARES, "1", "2", "3")
    cluster.wait_final(job_id)
    job = cluster.call(f"job {job_id}")
    assert job["state"] == "done", job
    assert [state for state, _ in job["transitions"]] == ["queued", "running", "done"]
    assert job["items_done"] == job["items_total"] == 3
    assert result_of(job) == [1, 4, 9]
    assert any(row["id"] == job_id for row in cluster.call("jobs --all"))
    assert all(row["id"] != job_id for row in cluster.call("jobs"))  # finished: only with --all
    assert re.search(rf"^job {job_id}: done$", cluster.ok(f"job {job_id}"), re.M)

    assert all(name in cluster.ok("help") for name in ("status", "submit", "cancel", "drain", "shutdown"))


def test_workers_counts_the_task_process_of_an_isolated_worker(cluster: Cluster) -> None:
    """The cluster isolates task code in a child process of each worker (the default): a worker's CPU, memory and
    threads are its own and its child's, or the admin would see an idle worker beside a task using a whole core."""
    cluster.settle()
    pool = 4  # threads the task starts, as a numerical library would
    job_id = cluster.submit(SPINS, f"600,{pool}")  # cancelled below, once seen

    def running_it(rows: list[dict]) -> dict | None:
        return next((row for row in rows if job_id in row["jobs"]), None)

    def counted_with_its_child(rows: list[dict]) -> bool:
        # The worker's own threads (main, heartbeat, ...) and the child's main thread beside the task's pool.
        row = running_it(rows)
        return row is not None and (row["cpu_percent"] or 0) >= 10 and (row["threads"] or 0) >= pool + 3

    try:
        rows = wait_until("the worker running the spin counted with its child", lambda: cluster.call("workers"),
                          counted_with_its_child, timeout=JOB_TIMEOUT)
        assert running_it(rows)["memory_bytes"] > 0, rows
    finally:
        assert cluster.ok(f"cancel {job_id}").strip() == f"job {job_id} cancelled"
    assert cluster.wait_final(job_id)[job_id]["state"] == "cancelled"


# -- the queue -----------------------------------------------------------------------------------


def test_the_queue_runs_jobs_by_priority_highest_first(cluster: Cluster) -> None:
    cluster.settle()
    assert cluster.ok("pause").strip() == "queue paused"
    assert cluster.call("status")["paused"] is True
    inputs = {0: ["1", "2"], 5: ["3", "4"], 9: ["5", "6"]}
    ids = {priority: cluster.submit(SQUARES, *inputs[priority], priority=priority) for priority in (0, 5, 9)}
    queue = cluster.call("queue")
    assert [job["id"] for job in queue] == [ids[9], ids[5], ids[0]]
    assert [job["priority"] for job in queue] == [9, 5, 0]
    assert all(job["state"] == "queued" and job["started"] is None for job in queue)

    assert cluster.ok("resume").strip() == "queue resumed"
    jobs = cluster.wait_final(*ids.values())
    assert all(job["state"] == "done" for job in jobs.values()), jobs
    started = [jobs[ids[priority]]["started"] for priority in (9, 5, 0)]
    assert started == sorted(started), started
    # --max-jobs 1: each started only after the one before it had finished
    assert jobs[ids[9]]["finished"] <= jobs[ids[5]]["started"] and jobs[ids[5]]["finished"] <= jobs[ids[0]]["started"]
    for priority, job_id in ids.items():
        assert result_of(jobs[job_id]) == [int(x) ** 2 for x in inputs[priority]]


def test_priority_moves_a_queued_job_ahead(cluster: Cluster) -> None:
    cluster.settle()
    cluster.ok("pause")
    first, second = cluster.submit(SQUARES, "7"), cluster.submit(SQUARES, "8")
    assert [job["id"] for job in cluster.call("queue")] == [first, second]  # same priority: oldest first

    assert cluster.ok(f"priority {second} 3").strip() == f"job {second} now has priority 3"
    queue = cluster.call("queue")
    assert [(job["id"], job["priority"]) for job in queue] == [(second, 3), (first, 0)]
    assert "no job 999999" in cluster.refused("priority 999999 1")

    cluster.ok("resume")
    jobs = cluster.wait_final(first, second)
    assert jobs[first]["state"] == jobs[second]["state"] == "done", jobs
    assert jobs[second]["started"] < jobs[first]["started"]
    assert result_of(jobs[second]) == [64] and result_of(jobs[first]) == [49]
    assert "only a queued job" in cluster.refused(f"priority {first} 5")


def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(cluster: Cluster) -> None:
    cluster.settle()
    # Three rounds of 60 s naps over three workers: still running when cancelled, however loaded the machine.
    running = cluster.submit(NAPS, *["60"] * 9)
    queued = cluster.submit(SQUARES, "4")  # behind it: --max-jobs 1
    assert cluster.job(running)["state"] == "running"
    assert cluster.job(queued)["state"] == "queued"
    wait_until(f"a worker working for job {running}", lambda: cluster.call("workers"),
               lambda rows: any(running in row["jobs"] for row in rows), timeout=20)

    assert cluster.ok(f"cancel {queued}").strip() == f"job {queued} cancelled"
    assert cluster.ok(f"cancel {running}").strip() == f"job {running} cancelled"
    job = cluster.job(running)
    assert job["state"] == "cancelled" and job["error"] == "cancelled by the admin", job
    assert job["result_path"] is None

    # the cluster carries on: a new job runs to the end
    after = cluster.submit(SQUARES, "11")
    jobs = cluster.wait_final(after)
    assert jobs[after]["state"] == "done" and result_of(jobs[after]) == [121]

    never = cluster.job(queued)
    assert never["state"] == "cancelled" and never["started"] is None, never
    assert [state for state, _ in never["transitions"]] == ["queued", "cancelled"]
    cancelled = cluster.job(running)
    assert cancelled["state"] == "cancelled"  # the naps that were under way did not revive it
    assert [state for state, _ in cancelled["transitions"]] == ["queued", "running", "cancelled"]
    assert not (cluster.run_dir / "results" / f"{running}.json").exists()

    reason = cluster.refused(f"cancel {after}")
    assert f"job {after} is done" in reason and "only a queued or running job can be cancelled" in reason
    assert "no job 999999" in cluster.refused("cancel 999999")


def test_cancelling_a_running_job_logs_no_traceback(cluster: Cluster) -> None:
    cluster.settle()
    before = len(cluster.log.read_text(errors="replace"))
    job_id = cluster.submit(NAPS, "2", "2", "2")
    cluster.ok(f"cancel {job_id}")
    assert cluster.job(job_id)["state"] == "cancelled"
    # rank 0's stderr reaches the log through mpiexec: give a traceback a moment to arrive
    deadline = time.monotonic() + 5
    while "Traceback" not in cluster.log.read_text(errors="replace")[before:] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Traceback" not in cluster.log.read_text(errors="replace")[before:], cluster.tail()


def test_retry_runs_a_failed_job_again(cluster: Cluster) -> None:
    cluster.settle()
    job_id = cluster.submit(FAILS_FIRST_TIME, "retried")
    job = cluster.wait_final(job_id)[job_id]
    assert job["state"] == "failed", job
    detail = cluster.job(job_id)
    assert "fails on purpose" in detail["error"] and "ValueError" in detail["traceback"]
    assert cluster.call("status")["failed"] >= 1

    assert cluster.ok(f"retry {job_id}").strip() == f"job {job_id} queued again"
    job = cluster.wait_final(job_id)[job_id]
    assert job["state"] == "done", job
    assert result_of(job) == "retried worked"
    transitions = [state for state, _ in cluster.job(job_id)["transitions"]]
    assert transitions == ["queued", "running", "failed", "queued", "running", "done"]

    assert "only a failed or cancelled job can be retried" in cluster.refused(f"retry {job_id}")


def test_a_job_whose_target_cannot_load_fails_and_the_cluster_goes_on(cluster: Cluster) -> None:
    cluster.settle()
    missing = cluster.submit(f"{HERE / 'jobs' / 'no_such_file.py'}:nothing", "1")
    job = cluster.wait_final(missing)[missing]
    assert job["state"] == "failed" and "does not exist" in job["error"], job
    fine = cluster.submit(SQUARES, "12")
    assert result_of(cluster.wait_final(fine)[fine]) == [144]


def test_a_task_file_that_exits_or_hangs_at_import_fails_its_job_and_the_cluster_goes_on(
        cluster: Cluster, tmp_path: Path) -> None:
    """Rank 0 imported a submitted file itself: os._exit at import ended the cluster, a hang froze its control plane."""
    cluster.settle()
    exits = tmp_path / "exits_at_import.py"
    exits.write_text("import os\nos._exit(7)\n")
    job_id = cluster.submit(f"{exits}:job", "1")
    job = cluster.wait_final(job_id)[job_id]
    assert job["state"] == "failed", job
    assert job["error"] == f"task file {exits} ended the process importing it: it exited with status 7 (os._exit at import?)"

    hangs = tmp_path / "hangs_at_import.py"
    hangs.write_text("import time\ntime.sleep(600)\n")
    submitting = subprocess.Popen(
        pydra("shell", "--connect", str(cluster.connection_file), "-i", str(cluster.identity), "--json", "-c",
              f"submit {hangs}:job 1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env, start_new_session=True,
    )
    try:
        assert cluster.call("status")["ranks"] == 4  # answered while the file is still importing
        out, err = submitting.communicate(timeout=SHELL_TIMEOUT + IMPORT_TIMEOUT)
    finally:
        if submitting.poll() is None:
            stop_group(submitting)
            submitting.wait()
    job = json.loads(out)
    assert job["state"] == "failed", job
    assert job["error"] == f"task file {hangs} took more than {IMPORT_TIMEOUT} s to import (PYDRA_IMPORT_TIMEOUT)"

    fine = cluster.submit(SQUARES, "5")
    assert result_of(cluster.wait_final(fine)[fine]) == [25]


def test_requests_that_import_leave_every_thread_of_the_others_free(cluster: Cluster, tmp_path: Path) -> None:
    """Submits of files that hung at import took every thread of the control plane (six on two cores): `status`,
    `cancel` and every other request waited for one, up to PYDRA_IMPORT_TIMEOUT."""
    import os
    import threading

    from pydra.control import IMPORTING_THREADS, ControlClient
    from pydra.launcher import keys

    cluster.settle()
    marks = tmp_path / "importing"
    marks.mkdir()
    hangs = tmp_path / "hangs_at_import.py"
    hangs.write_text(f"import os, time\nopen(os.path.join({str(marks)!r}, str(os.getpid())), 'w').close()\n"
                     "time.sleep(600)\n")
    identity = keys.load_private_key(cluster.identity)
    # More than the threads of the loop's default executor, which every request shared.
    submits = min(32, (os.cpu_count() or 1) + 4) + 1
    replies: list = []

    def submit() -> None:
        client = ControlClient(cluster.connection_file, identity, timeout=SHELL_TIMEOUT + 3 * IMPORT_TIMEOUT * submits)
        try:
            replies.append(client.call("submit", target=f"{hangs}:job", inputs=["1"]))
        finally:
            client.close()

    threads = [threading.Thread(target=submit, daemon=True) for _ in range(submits)]
    for thread in threads:
        thread.start()
    wait_until("imports under way on every importing thread", lambda: len(list(marks.iterdir())),
               lambda count: count >= IMPORTING_THREADS, timeout=SHELL_TIMEOUT)
    status = ControlClient(cluster.connection_file, identity)
    try:
        assert status.call("status")["ranks"] == 4
    finally:
        status.close()
    assert replies == []  # answered while every importing thread was still importing
    for thread in threads:
        thread.join(SHELL_TIMEOUT + 3 * IMPORT_TIMEOUT * submits)
    assert len(replies) == submits
    for job in replies:
        assert job["state"] == "failed", job
        assert job["error"] == f"task file {hangs} took more than {IMPORT_TIMEOUT} s to import (PYDRA_IMPORT_TIMEOUT)"


def test_a_task_file_that_no_longer_imports_fails_its_own_jobs_only(cluster: Cluster, tmp_path: Path) -> None:
    """An isolated worker's new child imported every task file the cluster had run: one gone bad failed every job."""
    cluster.settle()
    data = tmp_path / "data.txt"
    data.write_text("read at import ")
    reads_data = tmp_path / "reads_data.py"
    reads_data.write_text(
        "import pydra\n"
        f"DATA = open({str(data)!r}).read()\n\n"
        "def say(x: str) -> str:\n"
        "    return DATA + x\n\n"
        "def job() -> pydra.Task:\n"
        "    return pydra.Parallel(say)\n"
    )
    first = cluster.submit(f"{reads_data}:job", "a", "b", "c")
    assert result_of(cluster.wait_final(first)[first]) == ["read at import a", "read at import b", "read at import c"]
    data.unlink()
    for rank in (1, 2, 3):  # new children, which no longer import reads_data.py unless a unit needs it
        cluster.ok(f"restart {rank}")
    fine = cluster.submit(SQUARES, "2", "3", "4")
    job = cluster.wait_final(fine)[fine]
    assert job["state"] == "done" and result_of(job) == [4, 9, 16], job


def test_jobs_that_fail_to_start_take_no_place_in_the_queue(cluster: Cluster) -> None:
    """With max_jobs 1, a job whose target could not load counted as running: the next queued job never started."""
    cluster.settle()
    cluster.ok("pause")
    missing = [cluster.submit(f"{HERE / 'jobs' / 'no_such_file.py'}:nothing", "1") for _ in range(2)]
    fine = cluster.submit(SQUARES, "3")
    cluster.ok("resume")
    jobs = cluster.wait_final(*missing, fine)
    assert [jobs[job_id]["state"] for job_id in missing] == ["failed", "failed"], jobs
    assert result_of(jobs[fine]) == [9]


def test_the_workers_share_the_cores_before_any_job_loads_numpy(cluster: Cluster) -> None:
    """pydra.cpus at the cluster's start: three workers on this host share its cores (tests/test_cpus.py has the rules)."""
    from pydra import cpus

    cluster.settle()
    report = cluster.submit(f"{HERE.parent / 'core' / 'jobs' / 'cpus_report.py'}:Report", "a", "b", "c")
    for item in result_of(cluster.wait_final(report)[report]):
        share = str(max(1, item["cpus"] // 3))
        assert item["told"] == {name: share for name in cpus.VARIABLES}, item


# -- refusals ------------------------------------------------------------------------------------


def test_unknown_and_launch_only_keys_and_bad_command_lines_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    reason = cluster.refused("status", status=2, identity=stranger)
    assert "refused this key" in reason, reason

    launcher = keygen(tmp_path / "launcher")
    authorized = cluster.home / "authorized_keys"
    with open(authorized, "a") as handle:
        handle.write(f'pydra-role="launch" {launcher.with_suffix(".pub").read_text()}')
    reason = cluster.refused("status", status=2, identity=launcher)
    assert "refused this key" in reason, reason

    # authorized_keys is read at each connection: a key added now is let in at once
    with open(authorized, "a") as handle:
        handle.write(f'pydra-role="launch|admin" {stranger.with_suffix(".pub").read_text()}')
    done = cluster.shell("status", as_json=True, identity=stranger)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ranks"] == 4

    assert "bogus" in cluster.refused("bogus", status=2)
    assert "notanumber" in cluster.refused("job notanumber", status=2)
    cluster.refused("submit", status=2)
    cluster.refused("priority 1", status=2)
    cluster.refused("jobs --everything", status=2)
    assert "no job 999999" in cluster.refused("job 999999")
    assert cluster.refused("logs --rank 9") == "pydra shell: no rank 9: the ranks are 0..3"  # it said: (no log records)
    cluster.ok("logs --rank 3")
    cluster.ok("status")  # the cluster is unharmed


# -- changing the running cluster ----------------------------------------------------------------


def test_config_changes_settings_at_run_time(cluster: Cluster) -> None:
    cluster.settle()
    assert cluster.call("config")["max_jobs"] == 1
    assert re.search(r"^max_jobs\s+2$", cluster.ok("config max_jobs 2"), re.M)
    assert cluster.call("config")["max_jobs"] == 2
    assert "unknown setting 'nosuch'" in cluster.refused("config nosuch 1")
    assert "positive" in cluster.refused("config max_jobs 0")
    assert "expects int" in cluster.refused("config max_jobs many")
    assert cluster.call("config")["max_jobs"] == 2
    assert re.search(r"^retries\s+0$", cluster.ok("config retries 0"), re.M)  # the default, set again
    assert "0 or more" in cluster.refused("config retries -1")

    # two jobs now run at once: the second starts before the first (a second of naps) ends
    cluster.ok("pause")
    first, second = cluster.submit(NAPS, "1", "1"), cluster.submit(NAPS, "1", "1")
    cluster.ok("resume")
    jobs = cluster.wait_final(first, second)
    assert all(job["state"] == "done" and result_of(job) == [1, 1] for job in jobs.values()), jobs
    assert jobs[second]["started"] < jobs[first]["finished"], jobs

    cluster.ok("config max_jobs 1")
    assert cluster.call("config")["max_jobs"] == 1


def test_restart_gives_an_isolated_worker_a_new_executor(cluster: Cluster) -> None:
    cluster.settle()
    assert cluster.call("restart 1") == {"rank": 1, "restarted": True}
    assert "no worker rank 0" in cluster.refused("restart 0")
    job_id = cluster.submit(NAPS, *["0.1"] * 6)
    job = cluster.wait_final(job_id)[job_id]
    assert job["state"] == "done" and result_of(job) == [1] * 6, job


def test_drain_keeps_a_worker_out_of_new_work(cluster: Cluster) -> None:
    cluster.settle()
    assert cluster.ok("drain 2").strip() == "rank 2 draining"
    rows = wait_until("rank 2 draining", lambda: cluster.call("workers"),
                      lambda rows: rows[1]["state"] in ("draining", "drained"), timeout=20)
    done_before = rows[1]["units_done"]
    assert "no worker rank 0" in cluster.refused("drain 0")
    assert "no worker rank 7" in cluster.refused("drain 7")

    job_id = cluster.submit(NAPS, *["0.2"] * 6)
    job = cluster.wait_final(job_id)[job_id]
    assert job["state"] == "done" and result_of(job) == [1] * 6, job
    rows = cluster.call("workers")
    assert rows[1]["rank"] == 2 and rows[1]["state"] == "drained" and rows[1]["units_done"] == done_before, rows
    assert rows[0]["state"] == rows[2]["state"] == "idle", rows


def test_status_still_counts_a_drained_worker(cluster: Cluster) -> None:
    cluster.ok("drain 2")
    wait_until("rank 2 drained", lambda: cluster.call("workers"), lambda rows: rows[1]["state"] == "drained", timeout=20)
    assert sum(cluster.call("status")["workers"].values()) == 3


def test_undrain_puts_a_drained_worker_back_to_work(cluster: Cluster) -> None:
    cluster.ok("drain 2")
    rows = wait_until("rank 2 drained", lambda: cluster.call("workers"), lambda rows: rows[1]["state"] == "drained",
                      timeout=20)
    done_before = rows[1]["units_done"]
    assert cluster.ok("undrain 2").strip() == "rank 2 takes work again"
    wait_until("rank 2 idle", lambda: cluster.call("workers"), lambda rows: rows[1]["state"] == "idle", timeout=20)
    assert "no worker rank 0" in cluster.refused("undrain 0")
    assert cluster.ok("undrain 2").strip() == "rank 2 takes work again"  # a worker taking work already: no change

    job_id = cluster.submit(NAPS, *["0.2"] * 12)
    job = cluster.wait_final(job_id)[job_id]
    assert job["state"] == "done" and result_of(job) == [1] * 12, job
    rows = cluster.call("workers")
    assert rows[1]["rank"] == 2 and rows[1]["units_done"] > done_before, rows  # it ran some of the job


# -- the end -------------------------------------------------------------------------------------


def test_shutdown_ends_the_cluster_and_the_journal_keeps_every_job(cluster: Cluster) -> None:
    """Runs last: it stops the module's cluster."""
    from pydra.journal import Journal

    cluster.settle()
    last = cluster.submit(SQUARES, "13")
    cluster.wait_final(last)
    history = {job["id"]: job for job in cluster.call("jobs --all")}
    assert set(cluster.submitted) <= set(history)
    assert all(job["state"] in FINAL for job in history.values()), history

    assert cluster.ok("shutdown").strip() == "shutting down"
    try:
        status = cluster.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the cluster did not stop within 60 s of `shutdown`{cluster.tail()}")
    assert status == 0, cluster.tail()
    assert not cluster.connection_file.exists()
    assert f"cluster {cluster.run_dir.name} shut down" in cluster.log.read_text()
    reason = cluster.refused("status", status=2)
    assert "connection file" in reason

    journal = Journal.open(cluster.run_dir, create=False)
    try:
        recorded = {job["id"]: job for job in journal.jobs()}
        transitions = {job_id: [state for state, _ in journal.transitions(job_id)] for job_id in recorded}
    finally:
        journal.close()
    assert set(recorded) == set(history)
    for job_id, job in history.items():
        assert recorded[job_id]["state"] == job["state"], (job_id, recorded[job_id], job)
        assert recorded[job_id]["target"] == job["target"] and recorded[job_id]["inputs"] == job["inputs"]
        assert recorded[job_id]["priority"] == job["priority"]
        assert transitions[job_id][0] == "queued" and transitions[job_id][-1] == job["state"]
        if job["state"] == "done":
            assert recorded[job_id]["result_path"] == job["result_path"] and Path(job["result_path"]).is_file()


def test_shutdown_with_a_job_still_queued_ends_the_cluster(tmp_path: Path) -> None:
    """Its own cluster (the module's is stopped by now)."""
    with serving(tmp_path) as own:
        # --max-jobs 1: the second waits; the nap keeps the cluster up while the shell checks the refusal
        running, queued = own.submit(NAPS, "5"), own.submit(SQUARES, "2")
        assert own.ok("shutdown").strip() == "shutting down"
        assert "shutting down" in own.refused(f"submit {SQUARES} 3")
        try:
            status = own.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            states = own.jobs([running, queued])
            pytest.fail(f"still up 60 s after `shutdown`; jobs: {[(i, j['state']) for i, j in states.items()]}")
        assert status == 0, own.tail()


def test_with_every_worker_lost_rank_0_runs_no_task_and_the_cluster_takes_no_more_jobs(tmp_path: Path) -> None:
    """Rank 0 took the work over, running task code unisolated in the process that holds the control plane."""
    killer = tmp_path / "jobs" / "kills_its_rank.py"
    killer.parent.mkdir()
    killer.write_text(
        "import os, signal\nimport pydra\n\n"
        "def kill_my_rank(x: str) -> None:\n"
        "    os.kill(os.getppid(), signal.SIGKILL)  # isolated: the parent is the worker rank\n\n"
        "def job() -> pydra.Task:\n"
        "    return pydra.Parallel(kill_my_rank, chunksize=1)\n"
    )
    with serving(tmp_path) as own:
        doomed = own.submit(f"{killer}:job", "a", "b", "c")
        assert own.wait_final(doomed)[doomed]["state"] == "failed"
        wait_until("every worker lost", lambda: own.call("workers"),
                   lambda rows: [row["state"] for row in rows] == ["lost"] * 3)
        assert "every worker rank was lost, and an MPI job cannot start new ones" in own.refused(f"submit {SQUARES} 3")
        assert own.ok("shutdown").strip() == "shutting down"
        status = own.process.wait(timeout=60)
        log = own.log.read_text()
        assert "rank 0 runs the remaining work itself" not in log and "Traceback" not in log, own.tail()
        assert "pydra: every worker rank was lost, and an MPI job cannot start new ones" in log, own.tail()
        assert status == 0, own.tail()
