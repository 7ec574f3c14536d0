"""``pydra-remote-exec`` against a real agent, with each kind of stdin mpiexec may give it.

Hydra gives the ssh of its first proxy a pipe (mpiexec's stdin, for rank 0);
prterun gives every ssh /dev/null, which the event loop cannot watch (epoll
refuses it), nor a regular file. Whatever it is, its bytes reach the command,
then its end, and nothing is printed but the command's own output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agentkit import HOSTS, Cluster
from pydra.launcher.launch import helper_path
from pydra.launcher.remote import login_name
from testkit import run_process

TEXT = "first line\nsecond line, no newline at the end"


def _helper_env(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    host, port = HOSTS[0], cluster.ports[HOSTS[0]]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {Path(cluster.root / f'host-{host}.pub').read_text()}")
    return dict(cluster.env, PYDRA_AGENTS=json.dumps({"node": [host, port, login_name()]}),
                PYDRA_IDENTITY=str(cluster.identity), PYDRA_KNOWN_HOSTS=str(known_hosts))


@pytest.mark.parametrize("kind", ["devnull", "file", "pipe"])
def test_remote_exec_passes_on_any_stdin_without_a_traceback(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    env = _helper_env(cluster, tmp_path)
    expected = "" if kind == "devnull" else TEXT
    if kind == "devnull":
        stdin = os.open(os.devnull, os.O_RDONLY)
    elif kind == "file":
        (tmp_path / "input.txt").write_text(TEXT)
        stdin = os.open(tmp_path / "input.txt", os.O_RDONLY)
    else:
        stdin, writer = os.pipe()
        os.write(writer, TEXT.encode())
        os.close(writer)
    try:
        # `cat` ends only once the end of its stdin has arrived.
        done = run_process([helper_path(), "-x", "node", "cat; echo '<end>'"], timeout=60, env=env, stdin=stdin)
    finally:
        os.close(stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "<end>\n"
    assert done.stderr == ""


def test_a_command_whose_launcher_is_killed_is_asked_to_stop_first(cluster: Cluster, tmp_path: Path) -> None:
    # SIGTERM lets MPI's daemons stop their ranks and remove their files; a command that ignores it is
    # killed STOP_GRACE seconds later (tests/launcher/test_proctree.py).
    mark = tmp_path / "stopped"
    command = f"trap 'echo SIGTERM > {mark}; exit 0' TERM; echo ready; while :; do sleep 0.1; done"
    helper = subprocess.Popen([helper_path(), "-x", "node", command], env=_helper_env(cluster, tmp_path),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert helper.stdout.readline() == "ready\n"
        os.killpg(helper.pid, signal.SIGKILL)  # the launcher's end of the channel, gone without a word
        helper.wait()
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline, f"the command never got SIGTERM; agent log:\n{cluster.log(HOSTS[0])}"
            time.sleep(0.1)
        assert mark.read_text() == "SIGTERM\n"
        # The agent says so: the shell (and its `sleep` of the moment) asked to stop, none killed.
        stopped = re.compile(r"pid \d+: its channel from \S+ ended before the command did: [12] processes asked to stop "
                             r"\(SIGTERM\), 0 of them killed 5 s later")
        while not stopped.search(cluster.log(HOSTS[0])):
            assert time.monotonic() < deadline, f"no line about the stop; agent log:\n{cluster.log(HOSTS[0])}"
            time.sleep(0.1)
    finally:
        if helper.poll() is None:
            os.killpg(helper.pid, signal.SIGKILL)
            helper.wait()
