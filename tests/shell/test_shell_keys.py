"""``pydra shell`` signing with a key held by a real ssh-agent, and with a key unlocked by --passphrase-file."""

from __future__ import annotations

import subprocess
from pathlib import Path

from clusterkit import SHELL_TIMEOUT, Cluster, pydra
from sshagentkit import needs_openssh, ssh_agent, ssh_keygen  # noqa: F401 (ssh_agent is a fixture)
from testkit import run_process


def authorize_admin(cluster: Cluster, public_key_file: Path) -> None:
    with open(cluster.home / "authorized_keys", "a") as file:
        file.write(f'pydra-role="admin" {public_key_file.read_text()}')


@needs_openssh
def test_the_shell_signs_with_an_ssh_agent_key(cluster: Cluster, ssh_agent, tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_ed25519", "admin@laptop", passphrase="agent pass")
    ssh_agent.add(key, passphrase="agent pass")
    authorize_admin(cluster, Path(f"{key}.pub"))
    key.unlink()  # only ssh-agent holds it now; the .pub names it
    argv = pydra("shell", "--connect", str(cluster.connection_file), "-i", f"{key}.pub", "-c", "status")
    done = run_process(argv, timeout=SHELL_TIMEOUT, env=ssh_agent.env(cluster.env))
    assert done.returncode == 0, done.stderr


def test_the_shell_unlocks_a_key_with_a_passphrase_file(cluster: Cluster, tmp_path: Path) -> None:
    key = tmp_path / "locked"
    assert run_process(pydra("keygen", "-f", str(key), "-N", "file pass", "-C", "locked"), env=cluster.env).returncode == 0
    authorize_admin(cluster, Path(f"{key}.pub"))
    env = {name: value for name, value in cluster.env.items() if name != "SSH_AUTH_SOCK"}
    argv = pydra("shell", "--connect", str(cluster.connection_file), "-i", str(key), "-c", "status")
    locked = run_process(argv, timeout=SHELL_TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    assert locked.returncode == 2 and "protected by a passphrase" in locked.stderr, locked.stderr
    secret = tmp_path / "passphrase"
    secret.write_text("file pass\n")
    secret.chmod(0o600)
    done = run_process([*argv[:-2], "--passphrase-file", str(secret), "-c", "status"], timeout=SHELL_TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr
