"""A real OpenSSH ``ssh-agent`` for a test: started in its own process group, stopped by pid."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from testkit import stop_group

SSH_AGENT, SSH_ADD, SSH_KEYGEN = (shutil.which(name) for name in ("ssh-agent", "ssh-add", "ssh-keygen"))
needs_openssh = pytest.mark.skipif(
    None in (SSH_AGENT, SSH_ADD, SSH_KEYGEN), reason="needs ssh-agent, ssh-add and ssh-keygen (openssh-client)"
)


def ssh_keygen(path: Path, comment: str, passphrase: str = "") -> Path:
    """A new OpenSSH Ed25519 key at *path* (and *path*.pub), as a user's ~/.ssh/id_ed25519 is made."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


class SshAgent:
    """``ssh-agent -D -a SOCKET`` (foreground, so its pid is the agent's)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # A short path: a Unix socket's name may not exceed 107 bytes, and pytest's may be long.
        self._directory = tempfile.mkdtemp(prefix="pydra-ssh-agent-")
        self.socket = os.path.join(self._directory, "agent")
        self.process = subprocess.Popen([SSH_AGENT, "-D", "-a", self.socket], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            assert self.process.poll() is None, "ssh-agent exited"
            assert time.monotonic() < deadline, "ssh-agent did not make its socket"
            time.sleep(0.02)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """*base* (default: ours) with SSH_AUTH_SOCK pointing at this agent."""
        return {**(os.environ if base is None else base), "SSH_AUTH_SOCK": self.socket}

    def add(self, key: Path, passphrase: str = "") -> None:
        """``ssh-add KEY``; the passphrase, if any, given the way a desktop gives it: through SSH_ASKPASS."""
        env = self.env()
        if passphrase:
            askpass = self.root / "askpass.sh"
            askpass.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
            askpass.chmod(0o700)
            env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
        done = subprocess.run([SSH_ADD, str(key)], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=30, start_new_session=True)
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_group(self.process)
        self.process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)


@pytest.fixture
def ssh_agent(tmp_path: Path):
    """A running ssh-agent, stopped by pid when the test ends."""
    agent = SshAgent(tmp_path)
    yield agent
    agent.stop()
