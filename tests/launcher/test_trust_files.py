"""The files the agent, the launcher and the shell trust, end to end with real processes.

``authorized_keys`` in OpenSSH's syntax: a bad line (options separated by
spaces, another key type, an unknown option) grants nothing and locks out no
other line; the agent logs each skipped line with ``file:line`` and the reason
at start and whenever the file changes, and says in its log why it refused a
key (the launcher hears only "client not authorized").

Strict modes: ``pydra node``, ``pydra launch`` and ``pydra shell`` refuse, in
one line naming the file and what is wrong, a trust file that others could
write or that another user owns (that user is created by the test, as root,
and removed after it; those tests are skipped otherwise).

Every process runs in its own process group and is stopped by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from agentkit import free_port, keygen, pydra
from testkit import mpi_environment, run_process, stop_group
from userkit import User, other_user  # noqa: F401  (other_user is a fixture the tests ask for)

HOST = "127.0.0.2"
CLI_TIMEOUT = 60  # one pydra command that refuses at once, on a loaded 2-core machine
START_TIMEOUT = 30  # an agent writing "listening" to its log


class Agent:
    """One ``pydra node`` with its own PYDRA_HOME, host key and authorized_keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.env = mpi_environment()
        self.env["PYDRA_HOME"] = str(self.home)
        self.identity = self.home / "id_ed25519"
        keygen(self.identity, "launcher")
        self.host_key = root / "host_ed25519"
        keygen(self.host_key, HOST)
        self.authorized = self.home / "authorized_keys"
        self.log_path = root / "agent.log"
        self.port = free_port(HOST)
        self.hostfile = root / "hosts.txt"
        self.hostfile.write_text(f"{HOST} slots=2 port={self.port}\n")
        self.process: subprocess.Popen | None = None

    def public(self, key: Path) -> str:
        return key.with_suffix(".pub").read_text().strip()

    def start(self) -> None:
        self.process = subprocess.Popen(
            pydra("node", "--listen", f"{HOST}:{self.port}", "--host-key", str(self.host_key), "--log", str(self.log_path)),
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while "listening" not in self.log():
            assert self.process.poll() is None, f"the agent exited {self.process.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"the agent did not start:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def launch(self, *args: str, identity: Path | None = None):
        argv = pydra("launch", "-f", str(self.hostfile), "-i", str(identity or self.identity), "--accept-new", *args)
        return run_process(argv, timeout=120, env=self.env)

    def ping(self, identity: Path | None = None):
        """A launch that fails at once if this key is refused (and runs a tiny job if not)."""
        return self.launch("-n", "1", "examples/pipeline.py:pipeline", "2", identity=identity)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process)
            self.process.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    made = Agent(tmp_path)
    yield made
    made.stop()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


def refused_cli(argv: list[str], env: dict[str, str], status: int = 2) -> str:
    """The one line a pydra command that refuses a file prints, checking its exit status."""
    done = run_process(argv, timeout=CLI_TIMEOUT, env=env)
    assert done.returncode == status, f"exit {done.returncode}:\n{done.stdout}{done.stderr}"
    return one_line(done.stderr)


# -- authorized_keys: OpenSSH's syntax, skipped lines logged, a bad line costs only itself ----------------


def test_a_bad_line_locks_out_only_itself_and_the_agent_logs_why(agent: Agent, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger, "stranger")
    path = agent.authorized
    agent.authorized.write_text("\n".join([
        "# who may launch here",
        f'pydra-role="launch" from="127.0.0.0/8" {agent.public(stranger)}',  # spaces: the README's old mistake
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ old-laptop",
        f'pydra-role="launch",from="127.0.0.0/8" {agent.public(agent.identity)}',
    ]) + "\n")
    agent.start()
    log = agent.log()
    assert f"read {path}: 1 usable keys, 2 lines skipped" in log, log
    assert f"{path}:2: skipped: options must be separated by commas, not spaces" in log, log
    assert f"{path}:3: skipped: ssh-rsa keys are not supported" in log, log

    done = agent.ping()  # the valid key after the bad lines still works
    assert done.returncode == 0, done.stderr + agent.log()
    assert "accepted SHA256:" in agent.log()

    done = agent.ping(identity=stranger)
    assert done.returncode == 1 and "client not authorized" in done.stderr, done.stderr
    refusal = next(line for line in agent.log().splitlines() if "refused SHA256:" in line)
    assert f"is only on {path}:2, which is skipped: options must be separated by commas" in refusal, refusal

    # A reload: the file changes, the next connection reads it and logs its skipped lines again.
    with open(path, "a") as handle:
        handle.write(f"no-pty {agent.public(stranger)}\n")
    before = len(agent.log())
    assert agent.ping(identity=stranger).returncode == 1
    reloaded = agent.log()[before:]
    assert f"read {path}: 1 usable keys, 3 lines skipped" in reloaded, reloaded
    assert f"{path}:5: skipped: unsupported option 'no-pty'" in reloaded, reloaded
    # ...and an unchanged file is not logged again at every connection
    before = len(agent.log())
    assert agent.ping().returncode == 0
    assert "skipped" not in agent.log()[before:]


# -- strict modes: the agent -------------------------------------------------------------------


def test_the_agent_refuses_to_start_with_files_others_may_write(agent: Agent) -> None:
    agent.authorized.write_text(agent.public(agent.identity) + "\n")
    node = pydra("node", "--listen", f"{HOST}:{agent.port}", "--host-key", str(agent.host_key))

    agent.authorized.chmod(0o666)
    path = agent.authorized
    assert refused_cli(node, agent.env) == f"pydra node: refusing {path}: writable by others (mode 0666); chmod go-w {path}"
    agent.authorized.chmod(0o644)

    agent.home.chmod(0o777)  # ~/.pydra itself: anyone could swap authorized_keys
    assert refused_cli(node, agent.env) == (f"pydra node: refusing {path}: directory {agent.home} is writable by others "
                                            f"(mode 0777); chmod go-w {agent.home}")
    agent.home.chmod(0o700)

    agent.host_key.chmod(0o644)
    key = agent.host_key
    assert refused_cli(node, agent.env) == f"pydra node: refusing {key}: readable by others (mode 0644); chmod 600 {key}"


def test_a_running_agent_refuses_every_key_while_authorized_keys_is_unsafe_and_logs_why(agent: Agent) -> None:
    agent.authorized.write_text(agent.public(agent.identity) + "\n")
    agent.start()
    agent.authorized.chmod(0o646)
    done = agent.ping()
    assert done.returncode == 1 and "client not authorized" in done.stderr, done.stderr
    path = agent.authorized
    assert f"refusing {path}: writable by others (mode 0646); chmod go-w {path}" in agent.log()
    agent.authorized.chmod(0o600)
    done = agent.ping()
    assert done.returncode == 0, done.stderr + agent.log()


# -- strict modes: the launcher ----------------------------------------------------------------


def test_the_launcher_refuses_a_key_or_known_hosts_others_may_write(agent: Agent) -> None:
    launch = pydra("launch", "-f", str(agent.hostfile), "-n", "1", "examples/pipeline.py:pipeline", "2")
    agent.identity.chmod(0o640)
    key = agent.identity
    assert refused_cli(launch, agent.env) == f"pydra launch: refusing {key}: readable by its group (mode 0640); chmod 600 {key}"
    agent.identity.chmod(0o600)

    known = agent.home / "known_hosts"
    known.write_text("")
    known.chmod(0o666)
    assert refused_cli(launch, agent.env) == f"pydra launch: refusing {known}: writable by others (mode 0666); chmod go-w {known}"
    known.chmod(0o644)

    agent.home.chmod(0o770)
    assert refused_cli(launch, agent.env).startswith(f"pydra launch: refusing {key}: directory {agent.home} is writable by its group")


# -- strict modes: the shell -------------------------------------------------------------------


def connection_file(directory: Path, port: int = 1) -> Path:
    """A connection file as a cluster writes it, for a cluster whose rank 0 is this test (alive)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "planted.json"
    path.write_text(json.dumps({"cluster": "planted", "address": "127.0.0.1", "port": port,
                                "host_key": "SHA256:x", "pid": os.getpid(), "started": time.time()}))
    path.chmod(0o600)
    return path


def test_the_shell_follows_only_a_connection_file_of_yours_in_a_directory_only_you_can_write(agent: Agent,
                                                                                              tmp_path: Path) -> None:
    run = agent.home / "run"
    planted = connection_file(run)
    shell = pydra("shell", "-c", "status")
    run.chmod(0o777)  # as in the issue: anyone could plant a cluster here
    assert refused_cli(shell, agent.env) == f"pydra shell: refusing {run}: writable by others (mode 0777); chmod go-w {run}"
    run.chmod(0o700)

    planted.chmod(0o666)
    assert refused_cli(shell, agent.env) == (f"pydra shell: refusing {planted}: writable by others (mode 0666); "
                                             f"chmod go-w {planted}")
    planted.chmod(0o600)

    copied = connection_file(tmp_path / "shared")
    (tmp_path / "shared").chmod(0o1777)  # --connect to a file in a directory others can add to: refused too
    refusal = refused_cli([*shell, "--connect", str(copied)], agent.env)
    assert refusal.startswith(f"pydra shell: refusing {copied}: directory {tmp_path / 'shared'} is writable by others")
    (tmp_path / "shared").chmod(0o700)

    agent.identity.chmod(0o644)
    assert "readable by others (mode 0644)" in refused_cli(shell, agent.env)
    agent.identity.chmod(0o600)
    # with every file sound the shell gets as far as connecting (nobody listens on port 1)
    assert "cannot reach the cluster" in refused_cli(shell, agent.env)


def test_a_cluster_will_not_leave_its_connection_file_where_others_could_swap_it(agent: Agent) -> None:
    run = agent.home / "run"
    run.mkdir(mode=0o700)
    run.chmod(0o777)
    serve = pydra("serve", "-n", "2")
    assert refused_cli(serve, agent.env) == f"pydra serve: refusing {run}: writable by others (mode 0777); chmod go-w {run}"
    assert list(run.iterdir()) == []


# -- strict modes: files another user owns -----------------------------------------------------




def test_files_another_user_owns_are_refused_by_the_agent_the_launcher_and_the_shell(
        agent: Agent, other_user: User) -> None:
    owned = f"owned by {other_user.name} (uid {other_user.uid}), not by you (root)"

    agent.authorized.write_text(agent.public(agent.identity) + "\n")
    os.chown(agent.authorized, other_user.uid, -1)
    node = pydra("node", "--listen", f"{HOST}:{agent.port}", "--host-key", str(agent.host_key))
    assert refused_cli(node, agent.env).startswith(f"pydra node: refusing {agent.authorized}: {owned}")
    os.chown(agent.authorized, 0, -1)

    known = agent.home / "known_hosts"
    known.write_text("")
    os.chown(known, other_user.uid, -1)
    launch = pydra("launch", "-f", str(agent.hostfile), "-n", "1", "examples/pipeline.py:pipeline", "2")
    assert refused_cli(launch, agent.env).startswith(f"pydra launch: refusing {known}: {owned}")

    # The attack: the second user's connection file, where the shell looks for clusters.
    planted = connection_file(agent.home / "run")
    os.chown(planted, other_user.uid, other_user.gid)
    assert refused_cli(pydra("shell", "-c", "status"), agent.env).startswith(f"pydra shell: refusing {planted}: {owned}")
    os.chown(planted, 0, 0)
    os.chown(agent.home / "run", other_user.uid, other_user.gid)  # their directory of connection files
    refusal = refused_cli(pydra("shell", "-c", "status"), agent.env)
    assert refusal.startswith(f"pydra shell: refusing {agent.home / 'run'}: {owned}"), refusal
