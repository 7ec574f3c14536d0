"""Taking trust back, with real agents on loopback: SIGHUP stops a removed key's commands, @revoked host keys, from= host names."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentkit import HOSTS, Cluster, alive, keygen
from pydra.launcher import keys
from testkit import ROOT

# A launcher that runs one command through one agent and relays its output (what pydra-remote-exec does).
CLIENT = """
import asyncio, sys
from pathlib import Path
from pydra.launcher import keys
from pydra.launcher.launch import connect
from pydra.launcher.remote import client_exec
host, port, key, known_hosts, command = sys.argv[1:]
async def main():
    channel = await connect(host, int(port), keys.load_private_key(key), Path(known_hosts), True)
    return await client_exec(channel, command)
sys.exit(asyncio.run(main()))
"""


def fingerprint(key: Path) -> str:
    return keys.sha256_fingerprint(keys.load_public_key(f"{key}.pub"))


def wait_for(what: str, probe, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def test_sighup_stops_the_commands_of_a_key_no_longer_authorized(cluster: Cluster, tmp_path: Path) -> None:
    host, port = HOSTS[0], cluster.ports[HOSTS[0]]
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    keygen(alice, "alice")
    keygen(bob, "bob")
    cluster.authorized.write_text("".join(f'pydra-role="launch" {Path(f"{key}.pub").read_text()}' for key in (alice, bob)))
    clients = {}
    try:
        for who, key in (("alice", alice), ("bob", bob)):
            command = f"sleep 600; : {who}-command"
            clients[who] = subprocess.Popen(
                [sys.executable, "-c", CLIENT, host, str(port), str(key), str(tmp_path / "known_hosts"), command],
                cwd=ROOT, env=cluster.env, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        pids = {}
        for who, key in (("alice", alice), ("bob", bob)):
            line = wait_for(f"{who}'s command", lambda: next(
                (line for line in cluster.log(host).splitlines() if f"for {fingerprint(key)}" in line), None))
            pids[who] = int(line.split("started pid ")[1].split()[0])
            # Every command is logged: as whom, for which key, from where, and the command itself.
            me = f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()}, the agent's own user)"
            assert f"as {me} for {fingerprint(key)} from 127.0.0.1: \"sleep 600; : {who}-command\"" in line, line
        assert alive(pids["alice"]) and alive(pids["bob"])

        # bob's key leaves authorized_keys; nothing happens to his command until the agent is told.
        cluster.authorized.write_text(f'pydra-role="launch" {Path(f"{alice}.pub").read_text()}')
        agent = cluster.agents[0]
        os.kill(agent.pid, signal.SIGHUP)
        wait_for("bob's command to be stopped", lambda: not alive(pids["bob"]))
        _, stderr = clients["bob"].communicate(timeout=30)
        assert clients["bob"].returncode != 0
        assert "key no longer authorized" in stderr, stderr
        log = cluster.log(host)
        assert f"stopping the launch of {fingerprint(bob)} from 127.0.0.1: key {fingerprint(bob)} is not in" in log, log
        assert "2 running launches checked, 1 stopped" in log
        assert alive(pids["alice"]) and clients["alice"].poll() is None  # still authorized: untouched
        assert agent.poll() is None  # SIGHUP reloads; it does not stop the agent
    finally:
        for client in clients.values():
            if client.poll() is None:
                os.killpg(client.pid, signal.SIGTERM)
            client.communicate(timeout=30)
    # alice's launcher went away: the agent stops her command too (as before this change).
    wait_for("alice's command to be stopped", lambda: not alive(pids["alice"]))


def test_a_reload_of_an_unsafe_file_stops_nothing(cluster: Cluster, tmp_path: Path) -> None:
    host = HOSTS[1]
    cluster.authorized.chmod(0o666)
    os.kill(cluster.agents[1].pid, signal.SIGHUP)
    log = wait_for("the failed reload", lambda: "reload of" in cluster.log(host) and cluster.log(host))
    assert f"reload of {cluster.authorized} failed: the 0 running launches go on" in log
    assert f"refusing {cluster.authorized}: writable by others" in log
    cluster.authorized.chmod(0o600)


def test_a_revoked_host_key_stops_the_launch(cluster: Cluster, tmp_path: Path) -> None:
    known_hosts = tmp_path / "home" / "known_hosts"
    lines = [f"[{h}]:{cluster.ports[h]} {(tmp_path / f'host-{h}.pub').read_text()}" for h in HOSTS]
    revoked = (tmp_path / f"host-{HOSTS[1]}.pub").read_text()
    known_hosts.write_text("".join(lines) + f"@revoked * {revoked}")
    done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 1
    assert f"is revoked by {known_hosts}:4; pydra will not connect to it" in done.stderr, done.stderr
    assert "not starting the job" in done.stderr
    assert "accepted" not in cluster.log(HOSTS[1])  # the launcher hung up before identifying itself
    assert known_hosts.read_text().count("\n") == 4  # --accept-new recorded nothing


def test_a_from_host_name_is_refused_at_load_and_logged(cluster: Cluster, tmp_path: Path) -> None:
    public = Path(f"{cluster.identity}.pub").read_text()
    cluster.authorized.write_text(f"# a comment\nfrom=\"localhost\",pydra-role=\"launch\" {public}")
    for agent in cluster.agents:
        os.kill(agent.pid, signal.SIGHUP)
    for host in HOSTS:
        log = wait_for("the skipped line", lambda: "from= host name" in cluster.log(host) and cluster.log(host))
        assert f"{cluster.authorized}:2: skipped: from= host name 'localhost' is not supported" in log
    done = cluster.launch("-n", "2", "--accept-new", "examples/pipeline.py:pipeline", "3")
    assert done.returncode == 1
    for host in HOSTS:
        assert f"is only on {cluster.authorized}:2, which is skipped: from= host name" in cluster.log(host)
