"""``pydra node --system``: each launch runs as the local user whose ``authorized_keys`` allowed its key.

Real agents on loopback, real local users made by the test (as root) and
removed after it (:mod:`userkit`): user B holds the launcher's key in
``~B/.pydra/authorized_keys``; user C has a file of its own without it. The
agent runs as root with a host key in a directory others may enter but whose
key only root may read, so that what B cannot read is denied by the key's
own mode. Every process runs in its own process group and is stopped by pid.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentkit import free_port, keygen, pydra, start_node
from pydra.launcher import keys
from testkit import ROOT, mpi_environment, run_process, stop_group
from userkit import CAN_ADD_USERS, User, authorize, reachable_by_others, second_user

pytestmark = pytest.mark.skipif(not CAN_ADD_USERS, reason="needs root to create local users")

HOST = "127.0.0.2"
CANARY = "PRIVSEP_CANARY"  # in the agent's environment; must reach no command

# One request through the agent, as pydra-remote-exec makes it; exits 3 with the agent's refusal.
CLIENT = """
import asyncio, json, sys
from pathlib import Path
from pydra.comm.channel import ChannelError
from pydra.launcher import keys
from pydra.launcher.launch import connect
from pydra.launcher.remote import client_exec
host, port, key, known_hosts, user, env, command = sys.argv[1:]
async def main():
    channel = await connect(host, int(port), keys.load_private_key(key), Path(known_hosts), True)
    return await client_exec(channel, command, env=json.loads(env), user=user)
try:
    sys.exit(asyncio.run(main()))
except ChannelError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


@dataclass
class System:
    """A system agent, the launcher's key, and the users B (authorized) and C (not)."""

    root: Path  # the launcher's files (root's, mode 0700)
    shared: Path  # root's directory that everyone may enter: the host key, the log, root's files
    b: User
    c: User
    extra_group: int  # a supplementary group of B's
    identity: Path
    port: int
    agent: subprocess.Popen | None = None
    # Penalties off for the tests of who runs what, which refuse many requests from 127.0.0.1.
    settings: dict[str, str] = dataclasses.field(default_factory=lambda: {"PYDRA_PER_SOURCE_PENALTIES": "no"})

    @property
    def log_path(self) -> Path:
        return self.shared / f"agent-{self.port}.log"

    def log(self) -> str:
        return self.log_path.read_text()

    def fingerprint(self) -> str:
        return keys.sha256_fingerprint(keys.load_public_key(f"{self.identity}.pub"))

    def start(self) -> None:
        env = mpi_environment()
        env[CANARY] = "from-the-agent"
        env.update(self.settings)
        self.agent = start_node(["--system", "--listen", f"{HOST}:{self.port}",
                                 "--host-key", str(self.shared / "host_ed25519")], self.log_path, env)

    def run(self, user: str, command: str, env: dict[str, str] | None = None, timeout: float = 60):
        """Run *command* on the agent as *user*; the finished client (exit 3: refused)."""
        return run_process([sys.executable, "-c", CLIENT, HOST, str(self.port), str(self.identity),
                            str(self.root / "known_hosts"), user, json.dumps(env or {}), command],
                           timeout=timeout, env=mpi_environment(), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("privsep")
    shared = Path(tempfile.mkdtemp(prefix="pydra-privsep-"))
    group = f"pg{uuid.uuid4().hex[:8]}"
    try:
        shared.chmod(0o755)
        keygen(shared / "host_ed25519", HOST)  # 0600: root's alone
        (shared / "public.txt").write_text("anyone may read this\n")  # 0644: shows B can enter the directory
        (shared / "authorized_keys").write_text("# root's\n")  # 0644: B may read it, not write it
        identity = root / "id_ed25519"
        keygen(identity, "launcher")
        with second_user() as b, second_user() as c, reachable_by_others(sys.executable):
            subprocess.run(["groupadd", group], check=True, capture_output=True)
            try:
                subprocess.run(["usermod", "-a", "-G", group, b.name], check=True, capture_output=True)
                authorize(b, identity.with_suffix(".pub").read_text().strip())
                other = root / "other"
                keygen(other, "other")
                authorize(c, other.with_suffix(".pub").read_text().strip())
                system = System(root, shared, b, c, grp.getgrnam(group).gr_gid, identity, free_port(HOST))
                system.start()
                try:
                    yield system
                finally:
                    stop_group(system.agent)
                    system.agent.wait()
            finally:
                subprocess.run(["groupdel", group], capture_output=True)
    finally:
        shutil.rmtree(shared)


def test_a_launch_runs_as_the_user_whose_file_allows_it_with_a_clean_environment(system: System) -> None:
    b = system.b
    done = system.run(b.name, "id -u; id -g; id -G; pwd; env", env={"PYDRA_PROBE": "asked-for"})
    assert done.returncode == 0, done.stderr
    uid, gid, groups, cwd, *env_lines = done.stdout.splitlines()
    assert (int(uid), int(gid)) == (b.uid, b.gid)
    assert {int(g) for g in groups.split()} == {b.gid, system.extra_group}  # initgroups: B's groups, no root's
    assert cwd == str(b.home)
    env = dict(line.split("=", 1) for line in env_lines)
    assert CANARY not in env and "PYTHONPATH" not in env  # the agent's environment stays the agent's
    assert {name: env[name] for name in ("HOME", "USER", "LOGNAME", "PATH", "PYDRA_PROBE")} == {
        "HOME": str(b.home), "USER": b.name, "LOGNAME": b.name, "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYDRA_PROBE": "asked-for",
    }
    assert set(env) - {"PWD", "SHLVL", "_", "OLDPWD"} == {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "PYDRA_PROBE"}
    log = system.log()
    assert f"accepted {system.fingerprint()} from 127.0.0.1 as {b.name} ({b.home}/.pydra/authorized_keys:1)" in log
    assert f'as {b.name} (uid {b.uid}) for {system.fingerprint()} from 127.0.0.1: "id -u; id -g; id -G; pwd; env"' in log


def test_the_user_can_neither_read_the_host_key_nor_write_roots_files(system: System) -> None:
    shared = system.shared
    command = (f"cat {shared}/public.txt; cat {shared}/host_ed25519 || echo no-key; "
               f"echo x >> {shared}/authorized_keys || echo no-append; echo x >> {system.log_path} || echo no-log; "
               f"touch {shared}/planted || echo no-plant; echo x >> /root/.pydra/authorized_keys || echo no-root")
    done = system.run(system.b.name, command)
    assert "anyone may read this" in done.stdout, done.stderr  # B reaches the directory...
    assert "PRIVATE KEY" not in done.stdout  # ...but not the key in it
    for refusal in ("no-key", "no-append", "no-log", "no-plant", "no-root"):
        assert refusal in done.stdout, done.stdout
    assert (shared / "authorized_keys").read_text() == "# root's\n"
    assert not (shared / "planted").exists()


def test_environment_variables_other_than_pydras_and_mpis_are_refused(system: System) -> None:
    before = len(system.log())
    done = system.run(system.b.name, "echo ran", env={"LD_PRELOAD": "/tmp/evil.so"})
    assert done.returncode == 3
    assert "takes only PYDRA_* and MPI settings in a request's env, not 'LD_PRELOAD'" in done.stderr
    assert "ran" not in done.stdout
    log = system.log()[before:]
    assert f"refused the request of {system.fingerprint()} from 127.0.0.1 as {system.b.name}" in log
    assert "started pid" not in log


def test_a_key_in_one_users_file_runs_nothing_as_another_user_or_as_root(system: System) -> None:
    c = system.c
    for user, reason in (
        (c.name, f"key {system.fingerprint()} is not in {c.home}/.pydra/authorized_keys"),
        ("root", "user 'root' has uid 0: a system agent never runs a command as root"),
        ("nosuchuser", "no local user 'nosuchuser'"),
    ):
        before = len(system.log())
        done = system.run(user, "echo ran")
        assert done.returncode == 3, (user, done.stdout, done.stderr)
        assert f"client not authorized as {user}" in done.stderr
        assert "ran" not in done.stdout
        log = system.log()[before:]
        assert f"refused {system.fingerprint()} from 127.0.0.1 as {user}: {reason}" in log, log
        assert "started pid" not in log


@pytest.mark.parametrize("change, problem", [
    ("chmod 620 FILE", "FILE: writable by its group (mode 0620)"),
    ("chmod 606 FILE", "FILE: writable by others (mode 0606)"),
    ("chmod 644 FILE; chown C FILE", "FILE: owned by C (uid CUID), not by you (B)"),
    ("chmod 777 DIR", "FILE: directory DIR is writable by others (mode 0777)"),
])
def test_an_unsafe_authorized_keys_refuses_with_a_logged_reason(system: System, change: str, problem: str) -> None:
    b, c = system.b, system.c
    path = b.home / ".pydra" / "authorized_keys"
    words = {"FILE": str(path), "DIR": str(path.parent), "CUID": str(c.uid), "C": c.name, "B": b.name}
    for word, value in words.items():
        change, problem = change.replace(word, value), problem.replace(word, value)
    for step in change.split("; "):
        subprocess.run(step.split(), check=True)
    try:
        before = len(system.log())
        done = system.run(b.name, "echo ran")
        assert done.returncode == 3 and "ran" not in done.stdout
        assert f"refused {system.fingerprint()} from 127.0.0.1 as {b.name}: refusing {problem}" in system.log()[before:]
    finally:
        authorize(b, system.identity.with_suffix(".pub").read_text().strip())
        path.parent.chmod(0o700)
    assert system.run(b.name, "echo ran").stdout == "ran\n"  # fixed, it is trusted again


def test_the_file_is_read_as_its_user_so_a_link_to_roots_file_grants_nothing(system: System) -> None:
    b = system.b
    path = b.home / ".pydra" / "authorized_keys"
    secret = system.shared / "root-only-keys"  # root's, 0600, and it does hold the launcher's key
    secret.write_text(system.identity.with_suffix(".pub").read_text())
    secret.chmod(0o600)
    path.unlink()
    path.symlink_to(secret)
    os.lchown(path, b.uid, b.gid)
    try:
        before = len(system.log())
        done = system.run(b.name, "echo ran")
        assert done.returncode == 3 and "ran" not in done.stdout
        assert f"cannot read {path}: permission denied" in system.log()[before:]
    finally:
        path.unlink()
        secret.unlink()
        authorize(b, system.identity.with_suffix(".pub").read_text().strip())


def test_sighup_stops_a_users_launch_once_the_key_leaves_that_users_file(system: System) -> None:
    b = system.b
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, HOST, str(system.port), str(system.identity), str(system.root / "known_hosts"),
         b.name, "{}", "sleep 600; : privsep-revocation"],
        env=mpi_environment(), start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "privsep-revocation" not in system.log():
            assert time.monotonic() < deadline and client.poll() is None, "the command did not start"
            time.sleep(0.05)
        pid = int(system.log().split("privsep-revocation")[0].rsplit("started pid ", 1)[1].split()[0])
        assert Path(f"/proc/{pid}").stat().st_uid == b.uid
        (b.home / ".pydra" / "authorized_keys").write_text("# emptied\n")
        os.kill(system.agent.pid, signal.SIGHUP)
        _, stderr = client.communicate(timeout=60)
        assert client.returncode != 0 and "key no longer authorized" in stderr, stderr
        assert f"stopping the launch of {system.fingerprint()} from 127.0.0.1" in system.log()
    finally:
        if client.poll() is None:
            stop_group(client)
            client.communicate()
        authorize(b, system.identity.with_suffix(".pub").read_text().strip())


IDLE_CLIENT = """
import asyncio, sys
from pathlib import Path
from pydra.comm.channel import ChannelError
from pydra.launcher import keys
from pydra.launcher.launch import connect
host, port, key, known_hosts = sys.argv[1:]
async def main():
    channel = await connect(host, int(port), keys.load_private_key(key), Path(known_hosts), True)
    await channel.recv()  # sends no request
try:
    asyncio.run(main())
except ChannelError as exc:
    print(exc)
"""


def test_refused_requests_penalise_their_source_as_refused_keys_do(system: System) -> None:
    """sshd's authfail: a key no file allows as the user its request names counts against its address.

    A second system agent whose penalty for a refused key is enough to be enforced at once: one
    request as C, whose file lacks the key, and 127.0.0.1 is refused before its handshake, even
    for B, whose file has it, until the penalty runs out (a refused connection is held for the
    grace time, here 1 s, and the client tries a few times).
    """
    settings = {"PYDRA_PER_SOURCE_PENALTIES": "authfail:60 min:15 max:60", "PYDRA_LOGIN_GRACE_TIME": "1"}
    agent = dataclasses.replace(system, port=free_port(HOST), agent=None, settings=settings)
    agent.start()
    try:
        done = agent.run(agent.c.name, "echo ran")
        assert done.returncode == 3 and f"client not authorized as {agent.c.name}" in done.stderr, done.stderr
        log = agent.log()
        assert f"refused {agent.fingerprint()} from 127.0.0.1 as {agent.c.name}" in log, log
        assert "refusing 127.0.0.1 for 60 s: its handshakes keep failing (last: authfail)" in log, log
        done = agent.run(agent.b.name, "echo ran")
        assert done.returncode != 0 and "ran" not in done.stdout, done.stdout + done.stderr
        assert f"accepted {agent.fingerprint()}" not in agent.log()
    finally:
        stop_group(agent.agent)
        agent.agent.wait()
    assert system.run(system.b.name, "echo ran").stdout == "ran\n"  # the penalty was that listener's alone


def test_a_key_that_sends_no_request_is_closed_after_the_grace_time(system: System) -> None:
    done = run_process([sys.executable, "-c", IDLE_CLIENT, HOST, str(system.port), str(system.identity),
                        str(system.root / "known_hosts")], timeout=60, env=mpi_environment())
    assert done.returncode == 0 and "closed" in done.stdout, done.stdout + done.stderr
    assert "no request from 127.0.0.1 within 5.0 s: closing" in system.log()


WHO_TASKS = """
import os
import pydra


class Who(pydra.Task):
    def work(self, n):
        return [os.getuid(), os.getgid(), os.environ.get("HOME"), "PRIVSEP_CANARY" in os.environ]


def who():
    return pydra.Parallel(Who())
"""


def test_pydra_launch_runs_an_mpi_job_as_the_user_the_hostfile_names(system: System) -> None:
    b = system.b
    tasks, output = b.home / "who.py", b.home / "who.json"
    tasks.write_text(WHO_TASKS)
    os.chown(tasks, b.uid, b.gid)
    hostfile = system.root / "hosts.txt"
    hostfile.write_text(f"{b.name}@{HOST} slots=2 port={system.port}\n")
    env = mpi_environment()
    env["PYDRA_HOME"] = str(system.root)  # the launcher's, which B may not even enter: not the ranks'
    runs = b.home / ".pydra" / "runs"
    try:
        done = run_process(pydra("launch", "-f", str(hostfile), "-n", "2", "-i", str(system.identity), "--accept-new",
                                 str(tasks) + ":who", "1", "2", "--output", str(output)),
                           timeout=180, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert f"{b.name}@{HOST}" in done.stderr  # the host table says as whom
        assert json.loads(output.read_text()) == [[b.uid, b.gid, str(b.home), False]] * 2
        assert output.stat().st_uid == b.uid  # rank 0 wrote it, as B
        # Rank 0 journals in B's own PYDRA_HOME (~B/.pydra), not in the launcher's.
        [run_dir] = runs.iterdir()
        assert f"pydra: run directory {run_dir} " in done.stderr
        assert (run_dir / "journal.sqlite").stat().st_uid == b.uid
        assert not (system.root / "runs").exists()
    finally:
        output.unlink(missing_ok=True)
        tasks.unlink()
        shutil.rmtree(runs, ignore_errors=True)


def test_the_system_agent_refuses_to_start_unless_root(system: System) -> None:
    b = system.b
    done = subprocess.run(
        pydra("node", "--system", "--listen", f"{HOST}:{free_port(HOST)}"),
        user=b.uid, group=b.gid, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": str(b.home)},
        capture_output=True, text=True, timeout=60, start_new_session=True,
    )
    assert done.returncode == 2
    assert done.stderr == "pydra node: error: --system must run as root (it starts each launch as the user it names)\n"


def test_the_system_agent_refuses_a_host_key_others_may_read(system: System) -> None:
    key = system.shared / "readable_host_key"
    shutil.copy(system.shared / "host_ed25519", key)
    key.chmod(0o640)
    done = run_process(pydra("node", "--system", "--listen", f"{HOST}:{free_port(HOST)}", "--host-key", str(key)),
                       timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"pydra node: refusing {key}: readable by its group (mode 0640); chmod 600 {key}\n"


def test_a_missing_host_key_says_how_to_make_one(system: System) -> None:
    key = system.shared / "no_such_key"
    done = run_process(pydra("node", "--system", "--listen", f"{HOST}:{free_port(HOST)}", "--host-key", str(key)),
                       timeout=60)
    assert done.returncode == 2
    assert done.stderr == f'pydra node: error: no host key {key}: make one with `pydra keygen -f {key} -C "$(hostname)"`\n'
