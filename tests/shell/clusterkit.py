"""A service cluster for the shell tests: ``pydra serve -n 4`` in its own session, and a ``pydra shell -c`` driver.

:func:`serving` starts one (an admin key authorized, its own ``PYDRA_HOME``)
and stops it on exit: ``shutdown --now``, then its process group, never by
name. :class:`Cluster` runs shell commands against it and waits on jobs.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from testkit import mpi_environment, run_process, stop_group

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TASKS = HERE / "jobs" / "service_tasks.py"

SQUARES = f"{TASKS}:squares"
NAPS = f"{TASKS}:naps"
SPINS = f"{TASKS}:spins"
FAILS_FIRST_TIME = f"{TASKS}:fails_first_time"

FINAL = ("done", "failed", "cancelled")
WORKER_KEYS = {"rank", "host", "state", "jobs", "heartbeat_age", "cpu_percent", "memory_bytes", "threads", "units_done"}
SHELL_TIMEOUT = 30  # one `pydra shell -c` (each takes well under a second)
JOB_TIMEOUT = 60  # a job reaching a final state
IMPORT_TIMEOUT = 8  # the clusters' PYDRA_IMPORT_TIMEOUT: a task file's import takes well under a second




def pydra(*args: str) -> list[str]:
    return [sys.executable, "-m", "pydra", *args]


def keygen(path: Path) -> Path:
    """A new unencrypted Ed25519 key at *path* (and *path*.pub); returns *path*."""
    done = run_process(pydra("keygen", "-f", str(path), "-N", "", "-C", path.name), timeout=SHELL_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return path


def one_line(text: str) -> str:
    """*text* stripped, checked to be exactly one line."""
    text = text.strip()
    assert text and "\n" not in text, f"expected one line, got:\n{text}"
    return text


def wait_until(what: str, probe: Callable[[], Any], check: Callable[[Any], bool], timeout: float = JOB_TIMEOUT,
               interval: float = 0.2) -> Any:
    """Call *probe* until *check* accepts its value (returned); fail after *timeout* s with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached in {timeout} s; last seen:\n{json.dumps(value, indent=1)[:4000]}")
        time.sleep(interval)


@dataclass
class Cluster:
    """A running ``pydra serve -n 4`` and the means to talk to it with ``pydra shell``."""

    process: subprocess.Popen
    env: dict[str, str]
    home: Path
    identity: Path
    connection_file: Path
    run_dir: Path
    log: Path
    service_dir: Path
    submitted: list[int] = field(default_factory=list)

    # -- the shell ---------------------------------------------------------------------------

    def shell(self, command: str, *, as_json: bool = False, identity: Path | None = None):
        """``pydra shell --connect FILE -i KEY [--json] -c COMMAND``: the Finished subprocess."""
        argv = pydra("shell", "--connect", str(self.connection_file), "-i", str(identity or self.identity))
        argv += ["--json"] if as_json else []
        return run_process([*argv, "-c", command], timeout=SHELL_TIMEOUT, env=self.env)

    def ok(self, command: str) -> str:
        """The text output of a command that must succeed."""
        done = self.shell(command)
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr}{self.tail()}"
        return done.stdout

    def call(self, command: str) -> Any:
        """The parsed ``--json`` output of a command that must succeed."""
        done = self.shell(command, as_json=True)
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr}{self.tail()}"
        return json.loads(done.stdout)

    def refused(self, command: str, status: int = 1, **kwargs: Any) -> str:
        """The one-line complaint of a command that must exit *status* with nothing on stdout."""
        done = self.shell(command, **kwargs)
        assert done.returncode == status, f"{command!r} exited {done.returncode}, expected {status}:\n{done.stdout}{done.stderr}"
        assert done.stdout.strip() == ""
        return one_line(done.stderr)

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, target: str, *inputs: str, priority: int | None = None) -> int:
        """Submit a job (its id); with a priority, through ``--priority N``."""
        line = " ".join(["submit", target, *inputs, *([] if priority is None else ["--priority", str(priority)])])
        job = self.call(line)
        assert job["target"] == target and job["inputs"] == list(inputs)
        assert job["priority"] == (priority or 0)
        self.submitted.append(job["id"])
        return job["id"]

    def job(self, job_id: int) -> dict:
        return self.call(f"job {job_id}")

    def jobs(self, ids: list[int]) -> dict[int, dict]:
        """These jobs' summaries (from ``jobs --all``), by id."""
        every = {job["id"]: job for job in self.call("jobs --all")}
        return {job_id: every[job_id] for job_id in ids}

    def wait_final(self, *ids: int, timeout: float = JOB_TIMEOUT) -> dict[int, dict]:
        """Poll ``jobs --all`` until every job in *ids* is done, failed or cancelled."""
        return wait_until(
            f"jobs {list(ids)} finishing", lambda: self.jobs(list(ids)),
            lambda jobs: all(job["state"] in FINAL for job in jobs.values()), timeout,
        )

    def settle(self) -> None:
        """Back to the module's baseline: queue running, one job at a time, nothing queued or running."""
        self.ok("resume")
        self.ok("config max_jobs 1")
        wait_until("an idle queue", lambda: self.call("jobs"), lambda jobs: jobs == [])

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"\n--- cluster log (last 3000 chars) ---\n{text[-3000:]}"


def result_of(job: dict) -> Any:
    assert job["result_path"], job
    return json.loads(Path(job["result_path"]).read_text())


@contextlib.contextmanager
def serving(root: Path) -> Iterator[Cluster]:
    """``pydra serve -n 4 --max-jobs 1`` in a session of its own, an admin key authorized; stopped on exit."""
    home = root / "home"
    home.mkdir()
    service_dir = root / "marks"
    service_dir.mkdir()
    env = mpi_environment()
    env.update(PYDRA_HOME=str(home), FAULT_DIR=str(service_dir), PYDRA_IMPORT_TIMEOUT=str(IMPORT_TIMEOUT))
    identity = keygen(home / "id_ed25519")
    (home / "authorized_keys").write_text(f'pydra-role="admin" {identity.with_suffix(".pub").read_text()}')
    log = root / "serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            pydra("serve", "-n", "4", "--max-jobs", "1"), stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True,
        )
    cluster = None
    try:
        found = wait_until(
            "the cluster announcing its connection file",
            lambda: re.search(r"connection file (.+?); run directory (.+)$", log.read_text(), re.M)
            or process.poll() is not None,
            bool, timeout=60,
        )
        assert isinstance(found, re.Match), f"pydra serve exited {process.returncode}:\n{log.read_text()}"
        connection_file, run_dir = Path(found[1]), Path(found[2].strip())
        cluster = Cluster(process, env, home, identity, connection_file, run_dir, log, service_dir)
        yield cluster
    finally:
        try:
            if process.poll() is None and cluster is not None:
                cluster.shell("shutdown --now")
                process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if process.poll() is None:  # never by name: only this cluster's process group
                stop_group(process)
                process.wait(timeout=30)
