"""``pydra launch`` end to end: three agents on 127.0.0.2-4, each with its own host key.

Proves that a real MapReduce runs across the simulated hosts with every remote
MPI process started through an authenticated agent, and that unknown,
changed and unauthorized keys stop the launch before anything runs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from agentkit import HOSTS, Cluster, descendants, free_port, keygen, pydra, remove_session_directories, start_node
from testkit import gang_after_losing_a_member
from pydra.launcher import scratch
from pydra.launcher.mpiexec import OPEN_MPI, find_mpiexec
from testkit import ROOT, Running, mpi_environment, run_process, survives_losses

WORD = re.compile(r"[a-z']+")


@pytest.mark.smoke
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


def test_user_at_host_for_another_user_than_a_single_user_agents_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """The agent ran the job as its own user without a word, whatever user the hostfile named."""
    import pwd

    me = pwd.getpwuid(os.geteuid()).pw_name
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"nobody@{HOSTS[0]} port={cluster.ports[HOSTS[0]]}\n{me}@{HOSTS[1]} port={cluster.ports[HOSTS[1]]}\n")
    done = run_process(pydra("launch", "-f", str(hostfile), "-n", "2", "--accept-new", "examples/pipeline.py:pipeline",
                             "3"), timeout=90, env=cluster.env)
    assert done.returncode == 1 and "finished" not in done.stdout
    row = next(line for line in done.stderr.splitlines() if line.startswith(f"nobody@{HOSTS[0]}"))
    assert row.endswith(f"FAILED: this agent runs everything as {me}, not nobody: start `pydra node --system` "
                        "there, or write the host without nobody@"), done.stderr
    assert next(line for line in done.stderr.splitlines() if line.startswith(f"{me}@{HOSTS[1]}")).endswith("  ok")
    assert "started pid" not in cluster.log(HOSTS[0])  # nothing ran


def test_a_launch_held_off_by_a_penalty_says_so_and_gets_through_once_it_ends(cluster: Cluster, tmp_path: Path) -> None:
    """A penalised address's connections are held for the grace time, then dropped: the launch waited silently."""
    host, port = HOSTS[0], free_port(HOSTS[0])
    key = tmp_path / "host-key"
    keygen(key, host)
    # One refused key earns 8 s of penalty; a held connection is dropped after 2 s, so the launch's six tries
    # span more than 10 s: at least the first is refused, and a later one gets through.
    env = {**cluster.env, "PYDRA_PER_SOURCE_PENALTIES": "authfail:8 noauth:0 grace-exceeded:0 min:1 max:8",
           "PYDRA_LOGIN_GRACE_TIME": "2"}
    agent = start_node(["--listen", f"{host}:{port}", "--host-key", str(key), "--authorized-keys", str(cluster.authorized)],
                       tmp_path / "agent.log", env)
    try:
        hostfile = tmp_path / "hosts.txt"
        hostfile.write_text(f"{host} port={port}\n")
        stranger = tmp_path / "stranger"
        keygen(stranger, "stranger")
        job = ["-n", "1", "--accept-new", "examples/pi.py:estimate_pi", "10"]
        refused = run_process(pydra("launch", "-f", str(hostfile), "-i", str(stranger), *job), timeout=90, env=cluster.env)
        assert refused.returncode == 1, refused.stderr
        done = run_process(pydra("launch", "-f", str(hostfile), *job), timeout=90, env=cluster.env)
        assert done.returncode == 0, done.stderr
        assert done.stderr.count(f"pydra launch: the agent at {host}:{port} dropped our connection before the handshake "
                                 "(busy, or penalising this address for failed logins: see its log); trying again") == 1
        assert "source penalised" in (tmp_path / "agent.log").read_text()
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=10)


def test_a_malformed_target_is_refused_before_any_host_is_asked(cluster: Cluster) -> None:
    """The hosts were authenticated and the MPI job started before rank 0 said the TARGET was malformed."""
    done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py", "3")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("pydra launch: error: TARGET must look like path/to/file.py:Name or "
                                   "package.module:Name, got 'examples/pipeline.py'")
    for host in HOSTS:
        assert "from 127.0.0.1" not in cluster.log(host)  # no connection at all


def test_unauthorized_key_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger, "stranger")
    done = cluster.launch("-n", "2", "-i", str(stranger), "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 1
    assert "not starting the job" in done.stderr
    for host in HOSTS:
        assert "refused SHA256:" in cluster.log(host)
        assert "accepted" not in cluster.log(host)


class RecordingRelay:
    """A TCP relay on 127.0.0.5 in front of one agent that keeps every byte it passes."""

    def __init__(self, target_host: str, target_port: int) -> None:
        import threading

        self.recorded = bytearray()
        self.listener = socket.create_server(("127.0.0.5", 0))
        self.port = self.listener.getsockname()[1]
        self.target = (target_host, target_port)
        self.threads: list = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.recorded += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_recorded_launch_holds_no_key_material_and_no_command(cluster: Cluster, tmp_path: Path) -> None:
    from pydra.launcher import keys

    relay = RecordingRelay(HOSTS[0], cluster.ports[HOSTS[0]])
    try:
        cluster.hostfile.write_text(f"127.0.0.5 slots=2 port={relay.port}\n")
        output = tmp_path / "r.json"
        done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3", "4", "--output", str(output))
        assert done.returncode == 0, done.stderr
        assert json.loads(output.read_text()) == 2 * (14 + 30)
    finally:
        relay.close()
    recorded = bytes(relay.recorded)
    assert len(recorded) > 1000  # the proxy's whole session went through the relay
    user = keys.load_private_key(cluster.identity)
    host = keys.load_private_key(tmp_path / f"host-{HOSTS[0]}")
    from cryptography.hazmat.primitives import serialization

    secrets = [
        k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        for k in (user, host)
    ]
    publics = [keys.public_key_bytes(k) for k in (user, host)]
    for material in secrets + publics:
        assert material not in recorded
    for word in (b"hydra_pmi_proxy", b"pipeline", b"pydra run", b"python"):
        assert word not in recorded


def test_agent_survives_garbage_and_logs_it(cluster: Cluster) -> None:
    host, port = HOSTS[0], cluster.ports[HOSTS[0]]
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" * 5000, b""):
        with socket.create_connection((host, port)) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(15)
            while s.recv(4096):
                pass
    done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 0, done.stderr
    assert "refused" in cluster.log(host)


def test_agent_runs_as_a_daemon_with_a_pid_file(cluster: Cluster, tmp_path: Path) -> None:
    key = tmp_path / f"host-{HOSTS[0]}"
    pid_file, log = tmp_path / "daemon.pid", tmp_path / "daemon.log"
    port = free_port("127.0.0.6")
    done = run_process(pydra("node", "--daemon", "--listen", f"127.0.0.6:{port}", "--host-key", str(key),
                             "--authorized-keys", str(cluster.authorized), "--log", str(log),
                             "--pid-file", str(pid_file)), timeout=30, env=cluster.env)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and log.exists() and "listening" in log.read_text()):
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    try:
        cluster.hostfile.write_text(f"127.0.0.6 slots=2 port={port}\n")
        assert cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3").returncode == 0
        assert "accepted SHA256:" in log.read_text()
    finally:
        os.kill(pid, signal.SIGTERM)  # the daemon's own pid, from its pid file
    deadline = time.monotonic() + 10
    while pid_file.exists():
        assert time.monotonic() < deadline, "the daemon did not remove its pid file"
        time.sleep(0.05)


def processes_with(marker: str) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if marker in line and "ps -eo" not in line]


@pytest.mark.parametrize("how", ["ctrl-c", "dead-host", "killed-launcher"])
def test_interrupted_launch_leaves_no_process_on_any_host(cluster: Cluster, how: str, tmp_path: Path) -> None:
    """And a launch killed outright leaves its temporary files in one directory, which the next launch sweeps."""
    marker = f"pydra-job-{uuid.uuid4().hex[:12]}"
    target = str(ROOT / "tests" / "core" / "jobs" / "cli_targets.py") + ":Sleepy"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    # (Without progress lines: a job that writes to a dead launcher's pipe may die of it, and hide a job left running.)
    env = {**cluster.env, "PYDRA_PROGRESS": "off", "TMPDIR": str(temporary)} if how == "killed-launcher" else cluster.env
    launcher = subprocess.Popen(
        pydra("launch", "-f", str(cluster.hostfile), "-n", "4", "--accept-new", target, "60", marker),
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(launcher.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        # Past MPI's start-up (rank 0 names its run directory after MPI_Init): an interrupt
        # during start-up is another matter (a rank can hang in MPI_Init, see issue 13).
        while len([p for p in processes_with(marker) if "pydra run" in p]) < 4 or not any("run directory" in line for line in said):
            assert time.monotonic() < deadline, f"the job did not start: {processes_with(marker)}"
            time.sleep(0.1)
        if how == "ctrl-c":
            os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        elif how == "killed-launcher":
            launcher.kill()  # kill -9 of `pydra launch` alone: mpiexec, in a session of its own, ran on
        else:
            # The host vanishes: its agent and everything under it die at once (ranks included,
            # though Hydra gives them sessions of their own).
            dead = cluster.agents.pop(1)
            killed = descendants([dead.pid])
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            dead.wait()
            remove_session_directories(killed)
        launcher.wait(timeout=30)
        assert launcher.returncode != 0
        if how == "dead-host":  # not "interrupted": nobody interrupted it
            time.sleep(0.5)  # (the stderr thread's last lines)
            assert launcher.returncode == 1 and said[-1].startswith("pydra: the job ended before it finished ("), said
            assert "; resume with: pydra launch " in said[-1] and " --resume " in said[-1], said
        deadline = time.monotonic() + 15
        while processes_with(marker):
            assert time.monotonic() < deadline, "\n".join(processes_with(marker))
            time.sleep(0.1)
        if how == "killed-launcher":
            (left,) = [path for path in temporary.iterdir() if path.name.startswith(scratch.PREFIX)]
            assert {"hosts.txt", "lock"} <= {path.name for path in left.iterdir()}
            past = time.time() - 120  # as a launch a few minutes later finds it
            os.utime(left / "lock", (past, past))
            assert scratch.sweep(str(temporary)) == [str(left)]
            assert not [path for path in temporary.iterdir() if path.name.startswith(scratch.PREFIX)]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


@pytest.mark.smoke
@pytest.mark.skipif(not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)")
@pytest.mark.parametrize("target, inputs, expected", [
    ("map_kills_its_rank", ["apple", "cherry", "kill", "banana", "fig"] * 2,
     dict(sorted(collections.Counter("applecherrykillbananafig" * 2).items()))),
    ("gang_loses_a_member", ["5"], gang_after_losing_a_member(3, 5)),
])
def test_a_launched_job_survives_a_lost_worker(cluster: Cluster, tmp_path: Path, target, inputs, expected) -> None:
    """The job goes on without a dead rank (MPICH: through the tunnelled control plane; Open MPI: ULFM)."""
    faults = tmp_path / "faults"
    faults.mkdir()
    output = tmp_path / "out.json"
    cluster.env.update(FAULT_DIR=str(faults), PYDRA_HEARTBEAT_TIMEOUT="2")
    job = str(ROOT / "tests" / "core" / "jobs" / "fault_tasks.py") + ":" + target
    done = cluster.launch("-n", "4", "--accept-new", "--env", "FAULT_DIR", job, *inputs, "--output", str(output),
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr  # (PRRTE writes its paragraphs to stdout)
    assert json.loads(output.read_text()) == expected
    assert "pydra: lost worker rank" in done.stderr


def test_bad_env_options_are_one_line_usage_errors(cluster: Cluster) -> None:
    bad = cluster.launch("-n", "2", "--env", "1NOT-A-NAME", "examples/pipeline.py:pipeline", "3")
    assert bad.returncode == 2 and "--env '1NOT-A-NAME': expected NAME or NAME=VALUE" in bad.stderr
    unset = cluster.launch("-n", "2", "--accept-new", "--env", "SURELY_UNSET_HERE", "examples/pipeline.py:pipeline", "3")
    assert unset.returncode == 2 and "--env SURELY_UNSET_HERE: SURELY_UNSET_HERE is not set here" in unset.stderr


def test_this_host_by_a_loopback_name_runs_through_its_agent_too(cluster: Cluster, tmp_path: Path) -> None:
    """MPICH's mpiexec would fork a 'local' host's proxy itself, inside its private namespace (no network)."""
    cluster.start_agent("127.0.0.1", tmp_path / "host-127.0.0.2")
    cluster.hostfile.write_text(f"localhost slots=2 port={cluster.ports['127.0.0.1']}\n")
    done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 0, done.stderr
    assert "28" in done.stdout
    if find_mpiexec().implementation != OPEN_MPI:  # (prterun starts this host's ranks itself: nothing is remote)
        assert "started pid" in cluster.log("127.0.0.1")


def test_in_an_allocation_launch_takes_its_hosts_tasks_and_agent_port(cluster: Cluster, tmp_path: Path) -> None:
    """A simulated Slurm allocation of 127.0.0.2 (1 task) and 127.0.0.3 (2 tasks), agents on one shared port."""
    port = free_port("127.0.0.2")
    for host in ("127.0.0.2", "127.0.0.3"):
        cluster.start_agent(host, tmp_path / f"host-{host}", port)
    cluster.env.update(SLURM_JOB_ID="42", SLURM_JOB_NODELIST="127.0.0.2,127.0.0.3", SLURM_TASKS_PER_NODE="1,2",
                       SLURM_NTASKS="3")
    done = run_process(pydra("launch", "--agent-port", str(port), "--accept-new", "examples/pi.py:estimate_pi", "3",
                             "--no-journal"), timeout=120, env=cluster.env)
    assert done.returncode == 0, done.stderr
    assert "on 3 ranks" in done.stdout  # -n from the allocation
    assert re.search(rf"^127\.0\.0\.3\s+127\.0\.0\.3:{port}\s.*\s2\s.*\sok$", done.stderr, re.M), done.stderr

    # More ranks than the allocation's tasks: refused before any agent is asked.
    over = run_process(pydra("launch", "-n", "4", "--agent-port", str(port), "examples/pi.py:estimate_pi"),
                       env=cluster.env)
    assert over.returncode == 2
    assert over.stderr.strip() == ("pydra launch: error: -n 4 is more than the 3 tasks of this allocation "
                                   "(SLURM_TASKS_PER_NODE=1,2): ask the batch system for more, or give -n 3 or less")
    # A hostfile's slots are the user's own figure: going beyond them is only worth a warning.
    warned = cluster.launch("-n", "5", "--accept-new", "examples/pipeline.py:pipeline", "3", "--no-journal")
    assert warned.returncode == 0, warned.stderr
    assert f"pydra launch: warning: -n 5 is more than the 4 slots of {cluster.hostfile}" in warned.stderr


def test_without_hosts_launch_needs_n() -> None:
    outside = {name: value for name, value in mpi_environment().items() if not name.startswith(("SLURM_", "PBS_"))}
    done = run_process(pydra("launch", "examples/pipeline.py:pipeline", "3"), env=outside)
    assert done.returncode == 2
    assert done.stderr.strip() == "pydra launch: error: give -n N: there is no hostfile (-f) or allocation to take it from"


def test_a_first_launch_says_what_is_missing_in_one_line(tmp_path: Path) -> None:
    """The stumbles of a first launch: no hostfile, no key, no agent on a host; each says what to do."""
    env = {**mpi_environment(), "PYDRA_HOME": str(tmp_path / "home")}
    job = ["examples/pipeline.py:pipeline", "3", "--no-journal"]
    missing = tmp_path / "no-such-hostfile"
    done = run_process(pydra("launch", "-f", str(missing), *job), env=env)
    assert (done.returncode, done.stderr) == (
        2, f"pydra launch: error: cannot read the hostfile {missing}: No such file or directory\n")
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"127.0.0.2 slots=1 port={free_port('127.0.0.2')}\n")  # nothing listens there
    done = run_process(pydra("launch", "-f", str(hostfile), *job), env=env)
    key = tmp_path / "home" / "id_ed25519"
    assert (done.returncode, done.stderr) == (2, f"pydra launch: error: no key at {key}: make one with `pydra keygen`,"
                                                 " then add its .pub line to the authorized_keys of the agent"
                                                 " (`pydra node`) on every host\n")
    keygen(key, "launcher")
    done = run_process(pydra("launch", "-f", str(hostfile), *job), env=env)
    assert done.returncode == 1
    assert "FAILED: no agent listening there (start `pydra node` on that host)" in done.stderr, done.stderr
    assert done.stderr.endswith("pydra launch: not starting the job: some hosts could not be reached or"
                                " authenticated (STATUS above)\n"), done.stderr


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_launch_says_how_to_resume_and_resumes(cluster: Cluster, tmp_path: Path, signum: int,
                                                             status: int) -> None:
    started = tmp_path / "started"
    started.mkdir()
    cluster.env.update(STARTED_DIR=str(started), PYDRA_PROGRESS="off")
    run_dir, output = tmp_path / "run", tmp_path / "out.json"
    target = str(ROOT / "tests" / "core" / "jobs" / "interrupt_tasks.py") + ":squares"
    items = [str(x) for x in range(40)]
    job = Running(pydra("launch", "-f", str(cluster.hostfile), "-n", "4", "--accept-new", "--env", "STARTED_DIR",
                        target, *items, "--run-dir", str(run_dir), "-o", str(output)), cluster.env)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(started)) < 4:
            assert job.process.poll() is None and time.monotonic() < deadline, "".join(job.stderr)
            time.sleep(0.1)
        pids = set(job.processes())
        said = len(job.stderr)
        os.killpg(job.process.pid, signum)  # the launcher's group: what a terminal's Ctrl-C reaches
        assert job.wait(timeout=60) == status, "".join(job.stderr)
    finally:
        job.close()
    deadline = time.monotonic() + 20
    while (left := {pid for pid in pids if Path(f"/proc/{pid}").exists()}):
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.1)
    lines = job.stderr[said:]
    resume = f"pydra launch -f {cluster.hostfile} -n 4 --env STARTED_DIR --resume {run_dir}"
    assert len(lines) <= 2 and lines[-1].strip() == f"pydra: interrupted; resume with: {resume}", "".join(job.stderr)
    done = run_process(pydra(*shlex.split(resume)[1:]), timeout=240, env=cluster.env)
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text()) == [x * x for x in range(40)]


@pytest.mark.skipif(not survives_losses(), reason="surviving a lost worker rank needs MPICH or Open MPI 5 (docs/FAULT-TOLERANCE.md)")
def test_a_launch_interrupted_after_losing_a_host_says_how_to_resume_and_leaves_nothing(cluster: Cluster,
                                                                                      tmp_path: Path) -> None:
    """127.0.0.4's only rank is lost, the job goes on, then Ctrl-C. Hydra, told to stop, fails on that host's
    closed proxy connection and quits with rank 0's last line unsaid: the launcher says it and stops the rest."""
    started = tmp_path / "started"
    started.mkdir()
    run_dir = tmp_path / "run"
    cluster.env.update(STARTED_DIR=str(started), PYDRA_PROGRESS="off", PYDRA_HEARTBEAT_TIMEOUT="2")
    target = str(ROOT / "tests" / "core" / "jobs" / "interrupt_tasks.py") + ":squares"
    job = Running(pydra("launch", "-f", str(cluster.hostfile), "-n", "4", "--accept-new", "--env", "STARTED_DIR",
                        target, *map(str, range(400)), "--run-dir", str(run_dir)), cluster.env)
    agents = {agent.pid for agent in cluster.agents}
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(started)) < 6:
            assert job.process.poll() is None and time.monotonic() < deadline, "".join(job.stderr)
            time.sleep(0.1)
        os.kill(rank_on_an_agent(agents, 3), signal.SIGKILL)
        while not any("lost worker rank 3" in line for line in job.stderr):
            assert job.process.poll() is None and time.monotonic() < deadline, "".join(job.stderr)
            time.sleep(0.1)
        os.killpg(job.process.pid, signal.SIGINT)  # the launcher's group: what a terminal's Ctrl-C reaches
        assert job.wait(timeout=120) == 130, "".join(job.stderr)
    finally:
        job.close()
    deadline = time.monotonic() + 20
    while (left := descendants(list(agents)) - agents):
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.1)
    resume = f"pydra launch -f {cluster.hostfile} -n 4 --env STARTED_DIR --resume {run_dir}"
    assert job.stderr[-1].strip() == f"pydra: interrupted; resume with: {resume}", "".join(job.stderr)
    assert not any(line.startswith("[mpiexec@") for line in job.stderr), "".join(job.stderr)


def rank_on_an_agent(agents: set[int], rank: int) -> int:
    """The pid of MPI rank *rank* (not its supervisor) among the processes the agents *agents* started."""
    for pid in descendants(list(agents)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run" in argv and not any(word.endswith(b"supervise.py") for word in argv) and (
                f"PMI_RANK={rank}".encode() in environ or f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ):
            return pid
    raise LookupError(f"no rank {rank} under the agents")


@pytest.mark.smoke
@pytest.mark.skipif(not survives_losses(), reason="how the supervisor ends a job is known for MPICH and Open MPI 5")
@pytest.mark.parametrize("step", ["start", "gather-problems"])
def test_a_rank_lost_at_start_up_on_another_host_fails_the_launch(cluster: Cluster, step: str) -> None:
    """Rank 3 (127.0.0.4) killed before MPI starts or inside a start-up collective: the job ends with the
    supervisor's line, and `pydra launch` fails. (Hydra ends the ranks of that host's proxy only, and prterun
    exits 0 after losing a prted: the launcher stops the one and fails the other, see JobWatch.)"""
    jobs = ROOT / "tests" / "core" / "jobs"  # tests/core/test_startup_losses.py's job and hook
    tag = f"pydra-startup-{uuid.uuid4().hex[:12]}"
    cluster.env.update(FAULT_TAG=tag, FAULT_STEP=step, FAULT_RANK="3",
                       PYTHONPATH=f"{jobs / 'startup_hook'}{os.pathsep}{cluster.env['PYTHONPATH']}")
    done = cluster.launch("-n", "4", "--accept-new", "--no-journal",
                          *(f"--env={name}" for name in ("FAULT_TAG", "FAULT_STEP", "FAULT_RANK", "PYTHONPATH")),
                          f"{jobs / 'startup_loss.py'}:Tiny", "a", "b", "c", tag, timeout=180)
    assert done.returncode == 1, done.stderr
    said = re.findall(r"^pydra: rank 3 \(pid \d+\) was killed by SIGKILL during start-up, .*; ending the job$",
                      done.stderr, re.M)
    # prterun drops the line in some runs (docs/FAULT-TOLERANCE.md); it then says it lost a daemon.
    dropped = find_mpiexec().implementation == OPEN_MPI and "PRTE has lost communication" in done.stderr
    assert len(said) == 1 or (dropped and not said), done.stderr
    deadline = time.monotonic() + 15
    while processes_with(tag):
        assert time.monotonic() < deadline, "\n".join(processes_with(tag))
        time.sleep(0.1)


def test_the_resume_command_names_env_values_never_and_keeps_the_agent_port(tmp_path: Path) -> None:
    """``--env TOKEN=secret`` printed its secret in the resume line (and rank 0's log of it); ``--agent-port``
    was dropped, so the printed command could not reach the hosts."""
    import argparse

    from pydra.launcher import authorized
    from pydra.launcher.launch import launch_words

    args = argparse.Namespace(hostfile=None, ranks=2, identity=None, passphrase_file=None,
                              known_hosts=authorized.known_hosts_path(), agent_port=7471,
                              env=["TOKEN=s3cret", "FAULT_DIR"], iface=None)
    assert launch_words(args) == ["pydra", "launch", "-n", "2", "--agent-port", "7471",
                                  "--env", "TOKEN", "--env", "FAULT_DIR"]
