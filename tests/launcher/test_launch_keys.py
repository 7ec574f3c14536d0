"""``pydra launch`` with keys that have a passphrase, or that only ssh-agent holds, across three real agents.

Every host is reached twice (the ping of the host table, then the MPI proxy
that ``pydra-remote-exec`` starts), so two "accepted" lines per host prove
that the helpers mpiexec starts signed as the same key, without a key file
of their own: through ssh-agent, or through the key the launcher lends them.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

from agentkit import HOSTS, Cluster, pydra
from pydra.launcher import keys
from sshagentkit import needs_openssh, ssh_agent, ssh_keygen  # noqa: F401 (ssh_agent is a fixture)
from testkit import ROOT, run_process

JOB = ("-n", "4", "--accept-new", "examples/pipeline.py:pipeline", "3")  # prints 28; 4 ranks use every host


def authorize(cluster: Cluster, public_key_file: Path) -> str:
    """Add a key to the agents' authorized_keys; return its fingerprint."""
    line = public_key_file.read_text().strip()
    with open(cluster.authorized, "a") as file:
        file.write(f'pydra-role="launch" {line}\n')
    return keys.sha256_fingerprint(keys.load_public_key(line))


def assert_ran_as(cluster: Cluster, done, fingerprint: str) -> None:
    assert done.returncode == 0, done.stderr
    assert "28" in done.stdout
    for host in HOSTS:
        assert cluster.log(host).count(f"accepted {fingerprint} ") == 2, cluster.log(host)


@needs_openssh
def test_an_ssh_key_held_by_ssh_agent_launches_with_no_key_file(cluster: Cluster, ssh_agent, tmp_path: Path) -> None:
    ssh_dir = tmp_path / "dot-ssh"
    ssh_dir.mkdir(mode=0o700)
    key = ssh_keygen(ssh_dir / "id_ed25519", "me@laptop", passphrase="agent pass")
    ssh_agent.add(key, passphrase="agent pass")
    fingerprint = authorize(cluster, ssh_dir / "id_ed25519.pub")
    key.unlink()  # the private key now lives in ssh-agent alone
    cluster.identity.unlink()  # and there is no ~/.pydra/id_ed25519
    done = run_process(pydra("launch", "-f", str(cluster.hostfile), *JOB), timeout=90, env=ssh_agent.env(cluster.env))
    assert_ran_as(cluster, done, fingerprint)


def test_a_passphrase_file_unlocks_the_key(cluster: Cluster, tmp_path: Path) -> None:
    key = tmp_path / "locked"
    done = run_process(pydra("keygen", "-f", str(key), "-N", "file pass", "-C", "locked"), env=cluster.env)
    assert done.returncode == 0, done.stderr
    fingerprint = authorize(cluster, Path(f"{key}.pub"))
    env = {name: value for name, value in cluster.env.items() if name != "SSH_AUTH_SOCK"}
    # Without a passphrase, a terminal or ssh-agent: one line saying what to do, and no connection.
    refused = run_process(pydra("launch", "-f", str(cluster.hostfile), "-i", str(key), *JOB), env=env,
                          stdin=subprocess.DEVNULL)
    assert refused.returncode == 2
    assert f"{key} is protected by a passphrase" in refused.stderr and "--passphrase-file" in refused.stderr
    secret = tmp_path / "passphrase"
    secret.write_text("file pass\n")
    secret.chmod(0o644)
    loose = run_process(pydra("launch", "-f", str(cluster.hostfile), "-i", str(key), "--passphrase-file", str(secret), *JOB), env=env)
    assert loose.returncode == 2 and f"refusing {secret}: readable by" in loose.stderr, loose.stderr
    for host in HOSTS:
        assert "accepted" not in cluster.log(host)
    secret.chmod(0o600)
    done = run_process(pydra("launch", "-f", str(cluster.hostfile), "-i", str(key), "--passphrase-file", str(secret), *JOB),
                       timeout=90, env=env)
    assert_ran_as(cluster, done, fingerprint)


def test_the_passphrase_is_asked_on_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    key = tmp_path / "locked"
    secret = "tty-secret-8841"
    assert run_process(pydra("keygen", "-f", str(key), "-N", secret, "-C", "locked"), env=cluster.env).returncode == 0
    fingerprint = authorize(cluster, Path(f"{key}.pub"))
    env = {name: value for name, value in cluster.env.items() if name != "SSH_AUTH_SOCK"}
    master, slave = os.openpty()

    def on_the_terminal() -> None:  # a session of its own, with the pty as its controlling terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(pydra("launch", "-f", str(cluster.hostfile), "-i", str(key), *JOB), cwd=ROOT, env=env,
                               stdin=slave, stdout=slave, stderr=slave, preexec_fn=on_the_terminal)
    os.close(slave)
    terminal = Terminal(master)
    try:
        terminal.expect(b"Enter passphrase for ")
        os.write(master, b"not it\n")
        terminal.expect(b"Bad passphrase, try again.")
        terminal.expect(b"Enter passphrase for ")
        os.write(master, secret.encode() + b"\n")
        terminal.expect(None)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        os.close(master)
    text = terminal.screen.decode(errors="replace")
    assert status == 0, text
    assert "28" in text
    assert secret not in text and "not it" not in text  # typed without echo
    for host in HOSTS:
        assert cluster.log(host).count(f"accepted {fingerprint} ") == 2, cluster.log(host)


class Terminal:
    """The master side of a pty: what it shows, read up to a marker at a time."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.screen = b""
        self._read_to = 0  # markers are looked for after the last one found

    def expect(self, marker: bytes | None, timeout: float = 90) -> None:
        """Read until *marker* appears (None: until the last process leaves the terminal)."""
        deadline = time.monotonic() + timeout
        while marker is None or marker not in self.screen[self._read_to:]:
            shown = self.screen.decode(errors="replace")
            assert time.monotonic() < deadline, f"waited for {marker!r}, the terminal shows:\n{shown}"
            if not select.select([self.master], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: nothing holds the terminal any more
                chunk = b""
            if not chunk:
                assert marker is None, f"the terminal closed before {marker!r}:\n{shown}"
                return
            self.screen += chunk
        self._read_to = self.screen.index(marker, self._read_to) + len(marker)
