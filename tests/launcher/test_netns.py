"""mpiexec's private namespace: an ordinary user gets one, and its ports are out of everyone's reach."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pydra.launcher import netns
from userkit import CAN_ADD_USERS, second_user

ROOT = Path(__file__).resolve().parents[2]

# Inside the namespace: listen on every interface, show the port, and check loopback works there.
LISTENER = """
import socket, sys, time
server = socket.create_server(("0.0.0.0", 0))
socket.create_connection(("127.0.0.1", server.getsockname()[1])).close()
print(server.getsockname()[1], flush=True)
time.sleep(float(sys.argv[1]))
"""

RUN_ISOLATED = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
import netns
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[2], "20"], preexec_fn=netns.isolate).returncode)
"""


def start_isolated(python: str, module_dir: Path, user: str | None = None) -> subprocess.Popen:
    argv = [python, "-c", RUN_ISOLATED, str(module_dir), LISTENER]
    if user is not None:
        argv = ["su", user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def assert_unreachable(process: subprocess.Popen) -> None:
    try:
        line = process.stdout.readline()
        assert line.strip().isdigit(), process.stderr.read()
        port = int(line)
        for host in ("127.0.0.1", "127.0.0.2"):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, port), timeout=5).close()
    finally:
        os.killpg(process.pid, 9)
        process.wait()


def test_a_port_inside_the_namespace_is_unreachable_from_outside(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pydra" / "launcher" / "netns.py", tmp_path / "netns.py")
    assert_unreachable(start_isolated(sys.executable, tmp_path))


@pytest.mark.skipif(not CAN_ADD_USERS or not Path("/usr/bin/python3").exists(),
                    reason="needs root to create a second user, and a system python3")
def test_an_ordinary_user_gets_a_private_namespace() -> None:
    with second_user(home=False) as user:
        shared = Path(f"/tmp/{user.name}-netns")
        try:
            shared.mkdir(mode=0o755)
            shutil.copy(ROOT / "pydra" / "launcher" / "netns.py", shared / "netns.py")
            os.chmod(shared / "netns.py", 0o644)
            assert_unreachable(start_isolated("/usr/bin/python3", shared, user.name))
        finally:  # (second_user stops the user's processes by pid: su may leave one in a session of its own)
            shutil.rmtree(shared, ignore_errors=True)


def test_the_connector_reaches_only_the_jobs_agents(tmp_path: Path) -> None:
    agent = socket.create_server(("127.0.0.2", 0))
    port = agent.getsockname()[1]
    with agent, netns.Connector([("127.0.0.2", port)]) as connector:
        assert oct(os.stat(os.path.dirname(connector.path)).st_mode & 0o777) == "0o700"
        sock = netns.connect_through(connector.path, "127.0.0.2", port)
        with sock:
            accepted, _ = agent.accept()
            accepted.close()
        for host, other in (("127.0.0.3", port), ("127.0.0.2", port + 1)):
            with pytest.raises(ConnectionError, match="is not an agent of this job"):
                netns.connect_through(connector.path, host, other)
