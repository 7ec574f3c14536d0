"""Admin requests are checked against one schema (pydra.control.REQUESTS) before anything changes.

The unit tests pin the validator down: what it accepts is exactly what the
service's methods take and what the shell sends; anything else (a wrong type,
an unknown or missing field, a malformed request) is one line of error. The
cluster test sends the issue's poisoning request (``submit`` with
``"priority": "5"``) and others like it to a real ``pydra serve``, checks that
the queue and the settings are exactly as before, that normal ``submit``,
``queue``, ``config`` and ``shutdown`` then work, and that rank 0 logged every
refusal and every change with the admin key's fingerprint.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from clusterkit import NAPS, SHELL_TIMEOUT, SQUARES, Cluster, keygen, one_line, pydra, result_of, serving
from testkit import run_process, stop_group

from pydra import control
from pydra.control import FIELD_TYPES, REQUESTS, ControlClient, ControlError, validate_request
from pydra.launcher import keys
from pydra.service import Service
from pydra.shell.commands import parse

# -- the schema ------------------------------------------------------------------------------------

ANNOTATIONS = {"int": int, "int?": int | None, "str?": str | None, "bool": bool, "str": str, "[str]": list[str]}


@pytest.mark.parametrize("command", sorted(REQUESTS))
def test_the_schema_is_what_the_service_methods_take(command: str) -> None:
    schema = REQUESTS[command]
    method = getattr(Service, schema.method)
    parameters = dict(list(inspect.signature(method).parameters.items())[1:])  # without self
    hints = typing.get_type_hints(method)
    assert list(schema.fields) == list(parameters), command
    assert set(schema.required) == {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}
    for name, kind in schema.fields.items():
        assert kind.rstrip("?") in FIELD_TYPES
        assert hints[name] == ANNOTATIONS[kind], (command, name)


@pytest.mark.parametrize("line", [
    "status", "workers", "queue", "jobs", "jobs --all", "job 3", f"submit {SQUARES} 1 2", "submit x.py:T --priority -4",
    "cancel 3", "priority 3 9", "retry 3", "pause", "resume", "drain 2", "restart 2", "config", "config max_jobs",
    "config max_jobs 3", "logs", "logs 3 --rank 2", "shutdown", "shutdown --now",
])
def test_every_request_the_shell_sends_is_valid(line: str) -> None:
    command, args = parse(line)
    name, request = command.request(args)
    assert validate_request({"command": name, "args": request}) == (name, request)


def test_args_may_be_left_out_and_optional_fields_omitted() -> None:
    assert validate_request({"command": "status"}) == ("status", {})
    assert validate_request({"command": "logs", "args": {"job_id": None}}) == ("logs", {"job_id": None})


MALFORMED = [
    # the issue's poisoning request
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [], "priority": "5"}},
     'submit: priority must be an integer (64-bit), got "5"'),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [], "priority": True}}, "priority must be an integer"),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [], "priority": 2.5}}, "got 2.5"),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [], "priority": 2**63}}, "priority must be an integer"),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [], "priority": None}}, "got null"),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [1, 2]}}, "inputs must be a list of strings"),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": "1 2"}}, "inputs must be a list of strings"),
    ({"command": "submit", "args": {"target": "t\0.py:T", "inputs": []}}, "target must be a string with no NUL"),
    ({"command": "submit", "args": {"target": ["t.py:T"], "inputs": []}}, "target must be a string"),
    ({"command": "submit", "args": {"inputs": []}}, "submit: missing field 'target'"),
    ({"command": "submit", "args": {"target": "t.py:T"}}, "submit: missing field 'inputs'"),
    ({"command": "submit", "args": {"target": "t.py:T", "inputs": [], "owner": "x"}},
     'submit: unknown field "owner" (submit takes target, inputs, priority)'),
    ({"command": "priority", "args": {"job_id": 1, "priority": "9"}}, "priority must be an integer"),
    ({"command": "job", "args": {"job_id": "1"}}, 'job: job_id must be an integer (64-bit), got "1"'),
    ({"command": "shutdown", "args": {"now": "false"}}, 'shutdown: now must be true or false, got "false"'),
    ({"command": "jobs", "args": {"everything": 1}}, "everything must be true or false"),
    ({"command": "logs", "args": {"after": None}}, "logs: after must be an integer (64-bit), got null"),
    ({"command": "logs", "args": {"rank": "2"}}, "rank must be an integer (64-bit) or null"),
    ({"command": "config", "args": {"key": "max_jobs", "value": 2}}, "value must be a string with no NUL character or null"),
    ({"command": "pause", "args": {"now": True}}, 'pause: unknown field "now" (pause takes no fields)'),
    ({"command": "nosuch"}, 'unknown command "nosuch": expected one of'),
    ({"command": 7}, "NAME a string"),
    ({"command": "status", "args": []}, "args an object"),
    ({"command": "status", "args": None}, "args an object"),
    ({"command": "status", "extra": 1}, "and nothing else"),
    ({"args": {}}, "and nothing else"),
    (["status"], "and nothing else"),
    ({"command": "x" * 500}, "..."),
]


@pytest.mark.parametrize("request_, message", MALFORMED)
def test_a_malformed_request_is_one_line_of_error(request_: Any, message: str) -> None:
    with pytest.raises(ControlError) as raised:
        validate_request(request_)
    text = str(raised.value)
    assert message in text and "\n" not in text and len(text) < 300 and text[0].islower(), text


# -- a real cluster ---------------------------------------------------------------------------------


def state(cluster: Cluster) -> dict[str, Any]:
    """What the queue and the settings are: every job, the settings, the status but for the clock."""
    status = cluster.call("status")
    del status["uptime"]
    jobs = [{k: v for k, v in job.items() if k != "seconds"} for job in cluster.call("jobs --all")]
    return {"status": status, "jobs": jobs, "config": cluster.call("config")}


def raw(client: ControlClient, message: Any) -> dict:
    """Send *message* as it is (no shell in between) and return the cluster's reply."""
    with client._lock:
        return client._run(client._request(message))


def test_malformed_requests_change_nothing_and_the_cluster_goes_on(tmp_path: Path) -> None:
    with serving(tmp_path) as cluster:
        identity = keys.load_private_key(cluster.identity)
        fingerprint = keys.sha256_fingerprint(identity.public_key())
        cluster.ok("pause")  # a job queued now stays queued: the state compared below cannot move by itself
        queued = cluster.submit(SQUARES, "4", priority=1)
        before = state(cluster)

        client = ControlClient(cluster.connection_file, identity)
        try:
            reply = raw(client, {"command": "submit", "args": {"target": SQUARES, "inputs": ["2"], "priority": "5"}})
            assert reply == {"ok": False, "error": 'submit: priority must be an integer (64-bit), got "5"'}
            for message, _ in MALFORMED:
                if not isinstance(message, dict):
                    continue  # a frame that is not a JSON object is a protocol error: it ends the channel
                reply = raw(client, message)
                assert reply["ok"] is False and "\n" not in reply["error"], (message, reply)
            # well-typed, but refused by the service before it changes anything
            for command, args in [("config", {"key": "heartbeat_timeout", "value": "nan"}),
                                  ("config", {"key": "batch_seconds", "value": "inf"}),
                                  ("config", {"value": "3"}), ("config", {"key": "max_jobs", "value": "0"}),
                                  ("priority", {"job_id": 999999, "priority": 3})]:
                reply = raw(client, {"command": command, "args": args})
                assert reply["ok"] is False, (command, args, reply)
            assert state(cluster) == before
            assert client.call("queue")[0]["id"] == queued  # the same channel still serves
        finally:
            client.close()

        # Everything that failed with TypeError after the poisoning works.
        assert [job["id"] for job in cluster.call("queue")] == [queued]
        later = cluster.submit(SQUARES, "5", "6", priority=5)
        assert [job["id"] for job in cluster.call("queue")] == [later, queued]
        assert cluster.call("jobs")[0]["id"] == later
        assert re.search(r"^max_jobs\s+2$", cluster.ok("config max_jobs 2"), re.M)
        cluster.ok("resume")
        jobs = cluster.wait_final(queued, later)
        assert result_of(jobs[later]) == [25, 36] and result_of(jobs[queued]) == [16]

        # A well-typed target that breaks its import ("..x" is a relative module name) fails alone.
        broken = cluster.call("submit ..x:y")["id"]
        assert cluster.wait_final(broken)[broken]["state"] == "failed"
        fine = cluster.submit(NAPS, "0.1")
        assert cluster.wait_final(fine)[fine]["state"] == "done"

        stranger = keygen(tmp_path / "stranger")
        assert "refused this key" in cluster.refused("status", status=2, identity=stranger)
        stranger_fingerprint = keys.sha256_fingerprint(keys.load_private_key(stranger).public_key())

        assert cluster.ok("shutdown").strip() == "shutting down"
        try:
            assert cluster.process.wait(timeout=60) == 0, cluster.tail()
        except subprocess.TimeoutExpired:
            pytest.fail(f"the cluster did not stop within 60 s of `shutdown`{cluster.tail()}")

        log = cluster.log.read_text(errors="replace")
        admin = f"admin {fingerprint} from 127.0.0.1"
        assert re.search(rf'{re.escape(admin)}: refused request .*"priority": "5".*: submit: priority must be an integer', log), log
        assert re.search(rf"{re.escape(admin)}: refused config .*heartbeat_timeout.*finite", log), log
        for change in ("pause", "submit", "config", "resume", "shutdown"):
            assert re.search(rf"INFO {re.escape(admin)}: {change} ", log), (change, log[-3000:])
        assert not re.search(rf"{re.escape(admin)}: (status|queue|jobs|job|workers|config {{\"key\": null)", log)  # reads
        assert f"refused admin {stranger_fingerprint} from 127.0.0.1: key {stranger_fingerprint} is not in" in log
        assert json.dumps({"now": False}, sort_keys=True) in log  # the shutdown's args


def test_a_connection_file_without_an_address_is_one_clear_line(tmp_path: Path) -> None:
    """``pydra shell --connect FILE`` on a JSON file that is not a cluster's (it said only ``'address'``)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    connection = home / "cluster.json"
    connection.write_text("{}")
    connection.chmod(0o600)
    with pytest.raises(ControlError, match=r"^the connection file .*cluster\.json has no 'address': is it a cluster's"):
        ControlClient(connection, identity=None)  # type: ignore[arg-type]  (never reached)


def connection_file(run: Path, name: str, modified: float, **details: Any) -> Path:
    """A connection file in *run* as a cluster writes it, with *details* (host, pid, process_started) of its rank 0."""
    path = run / f"{name}.json"
    path.write_text(json.dumps({"cluster": name, "address": "127.0.0.1", "port": 1, "host_key": "SHA256:x", **details}))
    path.chmod(0o600)
    os.utime(path, (modified, modified))
    return path


def test_the_shell_takes_the_newest_running_cluster_and_removes_the_files_of_killed_ones(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    monkeypatch.setenv("PYDRA_HOME", str(tmp_path))
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    host, me = socket.gethostname(), os.getpid()
    started = control._process_started(me)
    never = int(Path("/proc/sys/kernel/pid_max").read_text())  # no process has this pid
    running = connection_file(run, "running", 100, host=host, pid=me, process_started=started)
    killed = connection_file(run, "killed", 200, host=host, pid=never, process_started=started)
    reused = connection_file(run, "reused", 300, host=host, pid=me, process_started=started - 1)  # an earlier process
    older_pydra = connection_file(run, "older", 400, pid=never)  # no host, no start time: the pid alone
    elsewhere = connection_file(run, "elsewhere", 500, host=f"not-{host}", pid=never, process_started=1)
    strange = connection_file(run, "strange", 600, host=host, pid="../self", process_started=started)
    assert control.newest_connection_file() == running
    assert not killed.exists() and not reused.exists() and not older_pydra.exists()
    assert elsewhere.exists()  # a home shared with another host: its cluster may run there
    assert strange.exists()  # not a cluster's file: neither taken nor removed
    running.unlink()
    with pytest.raises(ControlError, match="^no running cluster has a connection file in"):
        control.newest_connection_file()
    assert elsewhere.exists() and strange.exists()


def test_a_request_given_up_leaves_the_client_working_and_config_says_what_it_set(tmp_path: Path) -> None:
    """After a request timed out, the next one read the stale reply (a dict where a list was due) or failed with
    "read() called while another coroutine is already waiting", for as long as the shell ran."""
    slow = tmp_path / "slow_import.py"
    slow.write_text("import time\ntime.sleep(4)\nimport pydra\n\n\nclass T(pydra.Task):\n"
                    "    def work(self, x):\n        return x\n")
    with serving(tmp_path) as cluster:
        client = ControlClient(cluster.connection_file, keys.load_private_key(cluster.identity))
        try:
            client.timeout = 1.0
            with pytest.raises(ControlError, match=r"^lost the connection to the cluster at .*: no answer within 1 s$"):
                client.call("submit", target=f"{slow}:T", inputs=["x"], priority=0)
            client.timeout = 60.0
            assert client.call("status")["cluster"]  # this request's own reply
            assert isinstance(client.call("queue"), list)
            # config: the reply has the value just set (it had the one before), and a timeout that would
            # lose every worker is refused.
            assert client.call("config", key="retries", value="3")["retries"] == 3
            with pytest.raises(ControlError, match=r"^heartbeat_timeout must be more than twice the heartbeat"):
                client.call("config", key="heartbeat_timeout", value="0.1")
        finally:
            client.close()


DYING_CLUSTER = """
import os, threading
from pydra.control import ControlServer

def handle(command, args):
    os._exit(3)  # the cluster dies in the middle of a request

print(ControlServer(handle, "dying").start(), flush=True)
threading.Event().wait()
"""


def test_a_cluster_that_dies_during_a_request_is_one_line_from_the_shell(tmp_path: Path) -> None:
    """The shell said so, then printed asyncio's "Task was destroyed but it is pending!" and the task at exit."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    identity = keygen(home / "id_ed25519")
    (home / "authorized_keys").write_text(f'pydra-role="admin" {identity.with_suffix(".pub").read_text()}')
    env = {**os.environ, "PYDRA_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-c", DYING_CLUSTER], stdout=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    try:
        connection_file = server.stdout.readline().strip()  # type: ignore[union-attr]
        done = run_process(pydra("shell", "--connect", connection_file, "-i", str(identity), "-c", "status"),
                           timeout=SHELL_TIMEOUT, env=env)
    finally:
        if server.poll() is None:
            stop_group(server)
        server.wait()
    assert done.returncode == 1 and done.stdout == ""
    assert one_line(done.stderr).startswith("pydra shell: lost the connection to the cluster at 127.0.0.1:"), done.stderr
