"""A launched job is sealed: nothing of it answers on the network, nothing of it travels in the clear.

Three agents on 127.0.0.2-4 (MPICH). MPI's own traffic is forced onto TCP
over loopback (libfabric's tcp provider, no shared memory), so that a
recording of ``lo`` holds every byte the job moved between its "hosts".
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentkit import HOSTS, Cluster, descendants, pydra
from testkit import ROOT, stop_group

pytestmark = pytest.mark.skipif(
    "MPICH" not in subprocess.run(
        [sys.executable, "-c", "from pydra.launcher.mpiexec import library_implementation as l; print(l())"],
        capture_output=True, text=True, cwd=ROOT,
    ).stdout,
    reason="the control plane is sealed under MPICH only (docs/SECURITY.md)",
)

JOB = str(ROOT / "tests" / "launcher" / "jobs" / "sealed_job.py") + ":sealed"
ITEMS = ["input-marker-a91f", "input-marker-b82e", "input-marker-c73d"]
# With `pydra launch --iface lo`, which tells libfabric (FI_TCP_IFACE) to use lo.
TCP_OVER_LOOPBACK = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "MPIR_CVAR_NOLOCAL": "1"}
HYDRA_GREETING = b"HYD\0" + struct.pack("<ii", 0, 0)  # what a proxy sends mpiexec first


class RunningJob:
    """``pydra launch`` of the sealed job, held at its start until :meth:`release`."""

    def __init__(self, cluster: Cluster, tmp_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.directory = tmp_path / "units"
        self.directory.mkdir()
        self.output = tmp_path / "result.json"
        env = dict(cluster.env, SEALED_DIR=str(self.directory), **TCP_OVER_LOOPBACK, **(extra_env or {}))
        self.process = subprocess.Popen(
            pydra("launch", "-f", str(cluster.hostfile), "-n", "4", "--accept-new", "--iface", "lo", "--env", "SEALED_DIR",
                  "--env", "NAMED_SECRET=named-secret-5e6f", JOB, *ITEMS, "--output", str(self.output)),
            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait_started(self) -> None:
        deadline = time.monotonic() + 90
        while len(list(self.directory.glob("started-*"))) < len(ITEMS):
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the job's units did not start"
            time.sleep(0.1)

    def release(self) -> tuple[int, str, str]:
        (self.directory / "go").write_text("go")
        stdout, stderr = self.process.communicate(timeout=90)
        return self.process.returncode, stdout, stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_group(self.process)
            self.process.wait()


@pytest.fixture
def job(cluster: Cluster, tmp_path: Path):
    running = RunningJob(cluster, tmp_path, {"EXPORTED_SECRET": "exported-secret-1a2b"})
    yield running
    running.stop()


def expected_results() -> list[str]:
    import hashlib

    named = hashlib.sha256(b"named-secret-5e6f").hexdigest()[:12]
    return [("RESULT-MARKER-" + item[::-1]) * 20 + f" named={named} exported=False SOURCE" for item in ITEMS]


def listening_ports(pids: set[int]) -> list[tuple[str, int]]:
    """The TCP ports (IPv4 and IPv6) that processes *pids* listen on, in this network namespace."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except OSError:
            continue
    ports = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                ports.append((_address(address, family), int(port, 16)))
    return ports


def _address(hex_address: str, family: int) -> str:
    """A /proc/net/tcp address, as text."""
    raw = bytes.fromhex(hex_address)
    if family == 4:
        address = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        address = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return address


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def answer_to(address: tuple[str, int], payload: bytes) -> bytes:
    """Whatever a listener says back to *payload* within 2 s (b"" for a close or silence)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        probe.connect(address)
        probe.sendall(payload)
        probe.settimeout(2)
        received = b""
        try:
            while chunk := probe.recv(4096):
                received += chunk
        except (socket.timeout, ConnectionError):
            pass
        return received


def test_no_port_of_a_running_job_answers_a_proxy_greeting_or_junk(cluster: Cluster, job: RunningJob) -> None:
    job.wait_started()
    ps = subprocess.run(["ps", "-eo", "args", "-ww"], capture_output=True, text=True).stdout
    control_ports = {int(p) for p in re.findall(r"pydra-remote-exec .*--control-port 127\.0\.0\.1:(\d+)", ps)}
    assert control_ports, "no proxy was started through pydra-remote-exec"
    for port in control_ports:  # mpiexec's own port lives in its private namespace: nothing here
        for host in ["127.0.0.1", *HOSTS]:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, port), timeout=5).close()
    job_pids = descendants([job.process.pid, *(agent.pid for agent in cluster.agents)])
    job_pids -= {agent.pid for agent in cluster.agents}  # the agents' own port: see test_launch
    ports = listening_ports(job_pids)
    assert ports, "the ranks should listen for MPI's own connections"
    # --iface lo: MPI listens on loopback only (so this test's probes go nowhere else, too).
    assert all(is_loopback(address) for address, _ in ports), ports
    rng = random.Random(9)
    for address in ports:
        for payload in (HYDRA_GREETING, HYDRA_GREETING + struct.pack("<i", 1), rng.randbytes(4096)):
            assert answer_to(address, payload) == b"", address
    status, stdout, stderr = job.release()
    assert status == 0, stderr
    assert json.loads(job.output.read_text()) == expected_results()


def test_a_fake_proxy_that_connects_first_gets_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """The agent's end of a tunnel takes one connection, and only from the command it started."""
    from pydra.launcher import keys
    from pydra.launcher.launch import connect
    from pydra.launcher.remote import client_exec

    address_file, go = tmp_path / "address", tmp_path / "go"
    proxy = (
        f"echo @PYDRA_TUNNEL@ > {address_file}; while [ ! -e {go} ]; do sleep 0.05; done; "
        "exec python3 -c \"import socket,sys; h,p=sys.argv[1].rsplit(':',1); "
        "s=socket.create_connection((h,int(p))); s.sendall(b'environment-and-command-line'); s.recv(1)\" @PYDRA_TUNNEL@"
    )
    launcher_end = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve_launcher_end() -> None:
        connection, _ = launcher_end.accept()
        with connection:
            connection.settimeout(30)
            received.append(connection.recv(4096))

    threading.Thread(target=serve_launcher_end, daemon=True).start()

    async def run() -> int:
        identity = keys.load_private_key(cluster.identity)
        known = cluster.root / "home" / "known_hosts"
        channel = await connect(HOSTS[0], cluster.ports[HOSTS[0]], identity, known, accept_new=True)
        async with channel:
            return await client_exec(channel, proxy, tunnel_to=launcher_end.getsockname())

    def attack() -> bytes:
        deadline = time.monotonic() + 30
        while not address_file.exists() or not address_file.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        host, port = address_file.read_text().strip().rsplit(":", 1)
        got = answer_to((host, int(port)), HYDRA_GREETING)
        go.write_text("go")
        return got

    attacker = []
    thread = threading.Thread(target=lambda: attacker.append(attack()), daemon=True)
    thread.start()
    status = asyncio.run(asyncio.wait_for(run(), 60))
    thread.join(30)
    launcher_end.close()
    assert attacker == [b""]  # closed unanswered
    assert status == 0
    assert received == [b"environment-and-command-line"]  # the real command's bytes went through
    assert "refused a connection to a job's tunnel" in cluster.log(HOSTS[0])


class LoopbackRecorder:
    """Every packet on ``lo`` while it runs (AF_PACKET: needs root)."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._record, daemon=True)
        self.thread.start()

    def _record(self) -> None:
        while self.running:
            try:
                self.packets.append(self.sock.recv(1 << 17))
            except socket.timeout:
                continue

    def stop(self, host_local_ports: set[int]) -> bytes:
        """What was recorded, less the TCP segments to or from *host_local_ports*."""
        self.running = False
        self.thread.join()
        self.sock.close()
        return b"".join(p for p in self.packets if _tcp_ports(p).isdisjoint(host_local_ports))


def _tcp_ports(frame: bytes) -> set[int]:
    """The two ports of an IPv4 TCP segment in an ``lo`` frame (none for anything else)."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return set()
    header = 14 + (frame[14] & 0x0F) * 4
    return set(struct.unpack("!HH", frame[header : header + 4]))


@pytest.mark.skipif(os.geteuid() != 0, reason="recording lo needs root")
def test_a_recording_of_a_whole_launch_holds_no_secret(cluster: Cluster, job: RunningJob) -> None:
    recorder = LoopbackRecorder()
    host_local: set[int] = set()
    try:
        job.wait_started()
        # On a real host, the last hop of a tunnel (agent <-> proxy, on that host's own loopback)
        # never reaches the network: here every "host" shares lo, so leave those segments out.
        # Only this cluster's proxies: other tests on the machine may run launches of their own.
        ours = descendants([agent.pid for agent in cluster.agents])
        ps = subprocess.run(["ps", "-eo", "pid=,args=", "-ww"], capture_output=True, text=True).stdout
        host_local = {
            int(port) for pid, port in re.findall(r"^\s*(\d+) \S*hydra_pmi_proxy --control-port 127\.0\.0\.1:(\d+)", ps, re.M)
            if int(pid) in ours
        }
        assert len(host_local) == len(HOSTS), ps
        status, stdout, stderr = job.release()
    finally:
        recorded = recorder.stop(host_local)
    assert status == 0, stderr
    assert json.loads(job.output.read_text()) == expected_results()
    assert len(recorded) > 100_000, "MPI's traffic should be in the recording"
    forbidden = [
        b"exported-secret-1a2b", b"named-secret-5e6f",  # environment: not forwarded / inside the channel
        b"hydra_pmi_proxy", b"supervise", b"sealed_job", b"--output",  # command lines
        *(item.encode() for item in ITEMS),
        b"SOURCE-MARKER", b"RESULT-MARKER", b"class Sealed",  # the task source and the result
    ]
    for secret in forbidden:
        at = recorded.find(secret)
        assert at < 0, (secret, recorded[max(0, at - 300) : at + 100])
