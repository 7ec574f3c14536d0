"""mpiexec's private namespace: an ordinary user gets one, and its ports are out of everyone's reach."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pydra.launcher import netns

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


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not shutil.which("useradd"),
                    reason="needs root to create a second user, and a system python3")
def test_an_ordinary_user_gets_a_private_namespace() -> None:
    user = f"pydra{uuid.uuid4().hex[:8]}"
    shared = Path(f"/tmp/{user}-netns")
    subprocess.run(["useradd", "--no-create-home", user], check=True)
    try:
        shared.mkdir(mode=0o755)
        shutil.copy(ROOT / "pydra" / "launcher" / "netns.py", shared / "netns.py")
        os.chmod(shared / "netns.py", 0o644)
        assert_unreachable(start_isolated("/usr/bin/python3", shared, user))
    finally:
        kill_processes_of(user)  # su may leave the isolated child in a session of its own
        # userdel refuses while a process of the user is still going away: try for a while.
        deadline = time.monotonic() + 30
        while subprocess.run(["userdel", user], capture_output=True).returncode not in (0, 6):  # 6: no such user
            assert time.monotonic() < deadline, f"could not remove the test user {user}"
            time.sleep(0.2)
        shutil.rmtree(shared, ignore_errors=True)


def kill_processes_of(user: str) -> None:
    """SIGKILL, by pid, every process running as *user*."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        if int(real_uid) == uid:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass


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
