"""Agents on loopback hosts for the launcher tests: three ``pydra node`` processes, each with its own key.

The agents run in their own process groups and are stopped by pid when the test ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydra.launcher import proctree
from testkit import mpi_environment, run_process, stop_group

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def pydra(*args: str) -> list[str]:
    return [sys.executable, "-m", "pydra", *args]


def keygen(path: Path, comment: str) -> None:
    done = run_process(pydra("keygen", "-f", str(path), "-C", comment), timeout=30)
    assert done.returncode == 0, done.stderr


def start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``pydra node ARGS --log LOG`` in its own process group, once it listens."""
    log.unlink(missing_ok=True)
    agent = subprocess.Popen(pydra("node", *args, "--log", str(log)), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60  # a busy 2-core machine can take many seconds to start Python
    while "listening" not in (log.read_text() if log.exists() else ""):
        if agent.poll() is not None or time.monotonic() > deadline:
            stop_group(agent)
            agent.wait()
            raise AssertionError(f"pydra node {' '.join(args)} did not start: {log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    return agent


class Cluster:
    """Agents started for one test, stopped by pid at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = mpi_environment()
        self.env["PYDRA_HOME"] = str(root / "home")
        self.identity = root / "home" / "id_ed25519"
        keygen(self.identity, "launcher")
        self.authorized = root / "authorized_keys"
        self.authorized.write_text(f'pydra-role="launch" {self.identity.with_suffix(".pub").read_text()}')
        self.agents: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        try:
            for host in HOSTS:
                key = root / f"host-{host}"
                keygen(key, host)
                self.start_agent(host, key)
        except BaseException:
            self.stop()  # the agents already started: no test fixture will ever get to stop them
            raise
        self.hostfile = root / "hosts.txt"
        self.hostfile.write_text("".join(f"{h} slots={1 + (i == 1)} port={self.ports[h]}\n" for i, h in enumerate(HOSTS)))

    def start_agent(self, host: str, key: Path, port: int | None = None) -> None:
        port = port or free_port(host)
        log = self.root / f"agent-{host}.log"
        self.agents.append(start_node(
            ["--listen", f"{host}:{port}", "--host-key", str(key), "--authorized-keys", str(self.authorized)],
            log, self.env,
        ))
        self.ports[host] = port

    def log(self, host: str) -> str:
        return (self.root / f"agent-{host}.log").read_text()

    def launch(self, *args: str, timeout: float = 90):
        return run_process(pydra("launch", "-f", str(self.hostfile), *args), timeout=timeout, env=self.env)

    def stop(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


def session_directories() -> set[Path]:
    """Open MPI's daemons' session directories, ``/tmp/prted.PID``."""
    return set(Path(tempfile.gettempdir()).glob("prted.*"))


def remove_session_directories(pids: set[int]) -> None:
    """Open MPI's daemon (prted) killed outright leaves ``/tmp/prted.PID``; a later one given that pid fails to start
    ("A daemon failed to report back", status 213): remove those of *pids* that no process has now."""
    for pid in pids:
        if not Path(f"/proc/{pid}").exists():
            shutil.rmtree(Path(tempfile.gettempdir()) / f"prted.{pid}", ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not; nor does a process reaped between the two looks)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone between the open and the read (ESRCH), or before (ENOENT)
        return False


def descendants(roots: list[int]) -> set[int]:
    """Every process under *roots*, by parent links (ranks may sit in sessions of their own)."""
    return proctree.tree(*roots)
