"""``pydra launch`` end to end: three agents on 127.0.0.2-4, each with its own host key.

Proves that a real MapReduce runs across the simulated hosts with every remote
MPI process started through an authenticated agent, and that unknown,
changed and unauthorized keys stop the launch before anything runs.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, mpi_environment, run_process

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
WORD = re.compile(r"[a-z']+")


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def pydra(*args: str) -> list[str]:
    return [sys.executable, "-m", "pydra", *args]


def keygen(path: Path, comment: str) -> None:
    done = run_process(pydra("keygen", "-f", str(path), "-C", comment), timeout=30)
    assert done.returncode == 0, done.stderr


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
        for host in HOSTS:
            key = root / f"host-{host}"
            keygen(key, host)
            self.start_agent(host, key)
        self.hostfile = root / "hosts.txt"
        self.hostfile.write_text("".join(f"{h} slots={1 + (i == 1)} port={self.ports[h]}\n" for i, h in enumerate(HOSTS)))

    def start_agent(self, host: str, key: Path, port: int | None = None) -> None:
        port = port or free_port(host)
        log = self.root / f"agent-{host}.log"
        log.unlink(missing_ok=True)
        agent = subprocess.Popen(
            pydra("node", "--listen", f"{host}:{port}", "--host-key", str(key),
                  "--authorized-keys", str(self.authorized), "--log", str(log)),
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.agents.append(agent)
        self.ports[host] = port
        deadline = time.monotonic() + 20
        while "listening" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, f"agent on {host} did not start"
            time.sleep(0.05)

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


@pytest.fixture
def cluster(tmp_path: Path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.stop()


def test_mapreduce_runs_across_three_hosts_through_the_agents(cluster: Cluster, tmp_path: Path) -> None:
    files = sorted(str(p) for p in (ROOT / "examples" / "data").glob("*.txt"))
    output = tmp_path / "counts.json"
    done = cluster.launch("-n", "4", "--accept-new", "examples/wordcount.py:WordCount", *files, "--output", str(output))
    assert done.returncode == 0, done.stderr
    expected = collections.Counter(w for f in files for w in WORD.findall(Path(f).read_text().lower()))
    assert json.loads(output.read_text()) == dict(expected)
    for host in HOSTS:
        assert re.search(rf"^{re.escape(host)}\s.*\sok$", done.stderr, re.M), done.stderr
        # one connection for the ping of the host table, one for the MPI proxy it started
        assert cluster.log(host).count("accepted SHA256:") == 2, cluster.log(host)
    known = (tmp_path / "home" / "known_hosts").read_text()
    assert all(f"[{h}]:{cluster.ports[h]}" in known for h in HOSTS)


def test_unknown_host_key_is_refused_without_accept_new(cluster: Cluster) -> None:
    done = cluster.launch("-n", "2", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 1
    assert "not starting the job" in done.stderr
    assert "finished" not in done.stdout
    for host in HOSTS:
        assert "accepted" not in cluster.log(host)  # the launcher hung up before identifying itself


def test_changed_host_key_is_refused_loudly(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3").returncode == 0
    impostor = tmp_path / "impostor"
    keygen(impostor, "impostor")
    host, port = HOSTS[0], cluster.ports[HOSTS[0]]
    original = cluster.agents.pop(0)
    os.killpg(original.pid, signal.SIGTERM)
    original.wait(timeout=10)
    cluster.start_agent(host, impostor, port)  # same address, another key
    done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 1
    assert "CHANGED" in done.stderr.upper(), done.stderr
    assert "finished" not in done.stdout
    assert "accepted" not in cluster.log(host).split("listening")[-1]  # nothing ran on the impostor


def test_unauthorized_key_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger, "stranger")
    done = cluster.launch("-n", "2", "-i", str(stranger), "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 1
    assert "not starting the job" in done.stderr
    for host in HOSTS:
        assert "refused SHA256:" in cluster.log(host)
        assert "accepted" not in cluster.log(host)
