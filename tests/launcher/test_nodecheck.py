"""``pydra node --check``: one line per thing wrong with a host's agent setup, exit 1 if anything is.

A good setup passes (exit 0), also while its agent runs and holds the port;
each bad one (a file others may write, a skipped or expired ``authorized_keys``
line, no launch key, a missing or passphrase-protected host key, the port taken
by another process, an address that is not this host's, a bad setting, no
usable mpiexec) gets its line and exit 1. The bad setups run ``pydra node
--check`` in-process (``node_main``); the good one and the running agent run
real processes, stopped by pid.

``--check --system`` (as root, like the agent) is checked with a second local
user made by the test, whose ``~/.pydra/authorized_keys`` it reads as that
user: a good setup passes, a group-writable file of the user's, a host key
that is not root's or that others may read, a link to a file only root may
read and ``--authorized-keys`` are problems, and as anyone but root the
check says in one line that it needs root. ``--user`` keeps the check to the
test's user: other tests on this machine make users of their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkit import free_port, keygen, pydra
from pydra.launcher.mpiexec import library_implementation
from pydra.launcher.node import node_main
from testkit import mpi_environment, run_process, stop_group
from userkit import User, authorize, other_user, reachable_by_others  # noqa: F401  (other_user is a fixture the tests ask for)

HOST = "127.0.0.2"
START_TIMEOUT = 30  # an agent writing "listening" to its log, on a loaded 2-core machine


class Setup:
    """A host's agent files in their own PYDRA_HOME: a host key and an authorized_keys that lets one key launch."""

    def __init__(self, root: Path) -> None:
        self.home = root / "pydra-home"
        self.host_key = self.home / "host_ed25519"
        keygen(self.host_key, HOST)
        self.user_key = root / "user" / "id_ed25519"
        keygen(self.user_key, "user@launcher")
        self.public = self.user_key.with_suffix(".pub").read_text().strip()
        self.authorized = self.home / "authorized_keys"
        self.authorized.write_text(f'pydra-role="launch",from="127.0.0.0/8" {self.public}\n')
        self.port = free_port(HOST)
        self.pid_file = self.home / "node.pid"

    def options(self) -> list[str]:
        return ["--listen", f"{HOST}:{self.port}", "--host-key", str(self.host_key),
                "--authorized-keys", str(self.authorized), "--pid-file", str(self.pid_file)]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    made = Setup(tmp_path)
    monkeypatch.setenv("PYDRA_HOME", str(made.home))
    return made


def check(setup: Setup, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, list[str]]:
    """``pydra node --check`` in this process: its exit status and its lines."""
    status = node_main(["--check", *setup.options(), *extra])
    return status, capsys.readouterr().out.splitlines()


def problems(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("problem: ")]


def test_a_good_setup_passes(setup: Setup) -> None:
    env = {**mpi_environment(), "PYDRA_HOME": str(setup.home)}
    done = run_process(pydra("node", "--check", *setup.options()), timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert problems(lines) == [], done.stdout
    assert any(line.startswith(f"ok: host key {setup.host_key} (SHA256:") for line in lines), done.stdout
    assert f"ok: {setup.authorized}: 1 key may launch" in lines, done.stdout
    assert f"ok: {HOST}:{setup.port} is free to listen on" in lines, done.stdout
    assert any(line.startswith("ok: ") and f"launches {library_implementation()} jobs" in line for line in lines), done.stdout
    assert lines[-1] == "pydra node --check: all is well"


def test_without_paths_it_checks_the_agents_own_files(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    status = node_main(["--check", "--listen", f"{HOST}:{setup.port}"])  # PYDRA_HOME is the setup's
    lines = capsys.readouterr().out.splitlines()
    assert status == 0, lines
    assert any(line.startswith(f"ok: host key {setup.host_key} (SHA256:") for line in lines), lines
    assert f"ok: {setup.authorized}: 1 key may launch" in lines, lines


def test_a_port_held_by_the_running_agent_is_fine(setup: Setup) -> None:
    env = {**mpi_environment(), "PYDRA_HOME": str(setup.home)}
    log = setup.home / "node.log"
    agent = subprocess.Popen(
        pydra("node", *setup.options(), "--log", str(log)),
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "listening" not in (log.read_text() if log.exists() else ""):
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        done = run_process(pydra("node", "--check", *setup.options()), timeout=60, env=env)
    finally:
        stop_group(agent)
        agent.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    expected = f"ok: {HOST}:{setup.port} is held by the running agent (pid {agent.pid}, as {setup.pid_file} says)"
    assert expected in done.stdout.splitlines(), done.stdout


def test_an_agent_on_the_same_port_at_another_address_is_not_taken_for_this_ones(
        setup: Setup, capsys: pytest.CaptureFixture) -> None:
    """The listener was found by its port alone: a check of 127.0.0.2:P named the agent on 127.0.0.3:P as its own."""
    env = {**mpi_environment(), "PYDRA_HOME": str(setup.home)}
    log = setup.home / "other-node.log"
    elsewhere = ["--listen", f"127.0.0.3:{setup.port}", "--host-key", str(setup.host_key),
                 "--authorized-keys", str(setup.authorized)]
    agent = subprocess.Popen(pydra("node", *elsewhere, "--log", str(log)), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "listening" not in (log.read_text() if log.exists() else ""):
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        with socket.create_server((HOST, setup.port)):  # this test's own process holds this address
            status, lines = check(setup, capsys)
    finally:
        stop_group(agent)
        agent.wait()
    assert status == 1
    [line] = problems(lines)
    assert line.startswith(f"problem: {HOST}:{setup.port} is in use by pid {os.getpid()} "), line


def test_a_port_taken_by_another_process(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    with socket.create_server((HOST, setup.port)):  # this test's own process holds it
        status, lines = check(setup, capsys)
    assert status == 1
    [line] = problems(lines)
    assert line.startswith(f"problem: {HOST}:{setup.port} is in use by pid "), line
    assert "choose another port: --listen ADDR:PORT" in line


@pytest.mark.parametrize(
    ("target", "mode", "expected"),
    [
        ("authorized", 0o666, "{path}: writable by others (mode 0666); chmod go-w {path}"),
        ("host_key", 0o644, "{path}: readable by others (mode 0644); chmod 600 {path}"),
        ("home", 0o777, "{key}: directory {path} is writable by others (mode 0777); chmod go-w {path}"),
    ],
)
def test_files_others_could_write_are_named_with_the_fix(
    setup: Setup, capsys: pytest.CaptureFixture, target: str, mode: int, expected: str
) -> None:
    path = setup.home if target == "home" else getattr(setup, target)
    path.chmod(mode)
    status, lines = check(setup, capsys)
    assert status == 1
    line = f"problem: refusing {expected.format(path=path, key=setup.host_key)}"
    assert line in lines, lines


def test_files_another_user_owns(setup: Setup, capsys: pytest.CaptureFixture, other_user: User) -> None:
    owned = f"owned by {other_user.name} (uid {other_user.uid}), not by you (root)"
    os.chown(setup.authorized, other_user.uid, -1)
    os.chown(setup.home, other_user.uid, -1)
    status, lines = check(setup, capsys)
    assert status == 1
    assert problems(lines) == [
        f"problem: refusing {setup.host_key}: directory {setup.home} is {owned}; "
        "only directories that are yours or root's are trusted",
        f"problem: refusing {setup.authorized}: {owned}; only files that are yours or root's are trusted",
    ], lines


def test_every_skipped_line_is_named_with_its_reason(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    with setup.authorized.open("a") as file:
        file.write(f'pydra-role="launch" from="127.0.0.0/8" {setup.public}\n')  # spaces between options
        file.write(f'command="/bin/true" {setup.public}\n')
    status, lines = check(setup, capsys)
    assert status == 1
    path = setup.authorized
    assert problems(lines) == [
        f"problem: {path}:2: skipped: options must be separated by commas, not spaces (OpenSSH syntax): "
        'pydra-role="launch",from="10.0.0.0/8" ssh-ed25519 AAAA...; the agent ignores this line: fix or remove it',
        f"problem: {path}:3: skipped: unsupported option 'command' (pydra understands from, expiry-time and "
        "pydra-role); the agent ignores this line: fix or remove it",
    ], lines
    assert f"ok: {path}: 1 key may launch" in lines  # the good line still counts


def test_no_key_may_launch(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    setup.authorized.write_text(f'pydra-role="admin" {setup.public}\n')
    status, lines = check(setup, capsys)
    assert status == 1
    assert problems(lines) == [
        f"problem: no line of {setup.authorized} has the launch role, so nobody may launch here; "
        f"add the launching user's ~/.pydra/id_ed25519.pub to {setup.authorized}"
    ], lines


def test_an_expired_key(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    setup.authorized.write_text(f'expiry-time="20200101" {setup.public}\n')
    status, lines = check(setup, capsys)
    assert status == 1
    [line] = problems(lines)
    assert line.startswith(f"problem: {setup.authorized}:1: key SHA256:"), line
    assert line.endswith("expired on 2020-01-01 00:00; remove the line or give it a later expiry-time"), line


def test_missing_files(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    setup.host_key.unlink()
    setup.authorized.unlink()
    status, lines = check(setup, capsys)
    assert status == 1
    assert problems(lines) == [
        f'problem: host key {setup.host_key} does not exist; make one: pydra keygen -f {setup.host_key} -C "$(hostname)"',
        f"problem: {setup.authorized} does not exist, so nobody may launch here; "
        f"add the launching user's ~/.pydra/id_ed25519.pub to {setup.authorized}",
    ], lines


def test_a_host_key_with_a_passphrase(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    done = run_process(pydra("keygen", "--force", "-f", str(setup.host_key), "-N", "secret words"), timeout=60)
    assert done.returncode == 0, done.stderr
    status, lines = check(setup, capsys)
    assert status == 1
    assert problems(lines) == [
        f"problem: host key {setup.host_key} has a passphrase, which the agent cannot ask for (it starts "
        f"unattended); remove it: ssh-keygen -p -N '' -f {setup.host_key}"
    ], lines


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("no-such-host.invalid:7470", "problem: cannot resolve no-such-host.invalid: "),
        ("192.0.2.1:7470", "problem: 192.0.2.1:7470 is not an address of this host; give --listen one of its"),
    ],
)
def test_an_address_this_host_cannot_listen_on(
    setup: Setup, capsys: pytest.CaptureFixture, address: str, expected: str
) -> None:
    status, lines = check(setup, capsys, "--listen", address)  # the last --listen counts
    assert status == 1
    [line] = problems(lines)
    assert line.startswith(expected), line


def test_a_bad_setting_and_a_wrong_mpiexec(
    setup: Setup, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYDRA_MAX_STARTUPS", "lots")
    monkeypatch.setenv("PYDRA_MPIEXEC", "/bin/true")
    status, lines = check(setup, capsys)
    assert status == 1
    settings, mpi = problems(lines)
    assert settings.startswith("problem: PYDRA_MAX_STARTUPS") and settings.endswith("; fix or unset it"), settings
    assert mpi == ("problem: PYDRA_MPIEXEC=/bin/true launches an unknown launcher,"
                   f" but mpi4py uses {library_implementation()}"), mpi
    monkeypatch.setenv("PYDRA_MPIEXEC", "/no/such/mpiexec")
    _, lines = check(setup, capsys)
    assert problems(lines)[1] == ("problem: PYDRA_MPIEXEC=/no/such/mpiexec: no such command"
                                  " (give a path, or a name on PATH)")


def test_a_loopback_address_is_a_note_not_a_problem(setup: Setup, capsys: pytest.CaptureFixture) -> None:
    status, lines = check(setup, capsys)
    assert status == 0, lines
    assert f"note: {HOST} is a loopback address: no other machine can reach the agent; " \
           "to launch from elsewhere, --listen ADDR with this host's address on the network" in lines


# -- --check --system: as root, the host key, each user's authorized_keys read as that user -----


@pytest.fixture
def user_keys(setup: Setup, other_user: User) -> Iterator[Path]:
    """*other_user*'s ``~/.pydra/authorized_keys`` letting the setup's key launch, as the user makes it; removed after."""
    path = authorize(other_user, f'pydra-role="launch" {setup.public}')
    yield path
    shutil.rmtree(path.parent)


def system_options(setup: Setup, user: User) -> list[str]:
    return ["--system", "--listen", f"{HOST}:{setup.port}", "--host-key", str(setup.host_key), "--user", user.name]


def check_system(setup: Setup, user: User, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, list[str]]:
    status = node_main(["--check", *system_options(setup, user), *extra])
    return status, capsys.readouterr().out.splitlines()


def test_system_mode_a_good_setup_passes(setup: Setup, other_user: User, user_keys: Path) -> None:
    done = run_process(pydra("node", "--check", *system_options(setup, other_user)), timeout=60, env=mpi_environment())
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert problems(lines) == [], done.stdout
    assert any(line.startswith(f"ok: host key {setup.host_key} (SHA256:") for line in lines), done.stdout
    assert f"ok: {user_keys}: 1 key may launch as {other_user.name}" in lines, done.stdout
    assert f"ok: 1 user may launch here: {other_user.name}" in lines, done.stdout
    assert f"ok: {HOST}:{setup.port} is free to listen on" in lines, done.stdout
    assert lines[-1] == "pydra node --check: all is well"


def test_system_mode_names_the_users_file_others_may_write(
    setup: Setup, other_user: User, user_keys: Path, capsys: pytest.CaptureFixture
) -> None:
    user_keys.chmod(0o620)
    status, lines = check_system(setup, other_user, capsys)
    assert status == 1
    assert problems(lines) == [
        f"problem: refusing {user_keys}: writable by its group (mode 0620); chmod go-w {user_keys}",
        f"problem: no key may launch as {other_user.name}, so nobody may launch here; each user adds the launching "
        "user's ~/.pydra/id_ed25519.pub to their own ~/.pydra/authorized_keys",
    ], lines


def test_system_mode_reads_the_file_as_its_user(
    setup: Setup, other_user: User, user_keys: Path, capsys: pytest.CaptureFixture
) -> None:
    # A link from the user's file to one only root may read, which does hold the key: the agent, reading
    # as the user, cannot follow it, and neither does the check.
    user_keys.unlink()
    user_keys.symlink_to(setup.authorized)  # root's, 0644 in a 0700 directory of root's
    os.lchown(user_keys, other_user.uid, other_user.gid)
    status, lines = check_system(setup, other_user, capsys)
    assert status == 1
    assert f"problem: cannot read {user_keys}: Permission denied" in lines, lines


@pytest.mark.parametrize("change", ["owner", "mode"])
def test_system_mode_wants_a_host_key_only_root_may_read(
    setup: Setup, other_user: User, user_keys: Path, capsys: pytest.CaptureFixture, change: str
) -> None:
    key = setup.host_key
    if change == "owner":
        os.chown(key, other_user.uid, -1)
        expected = (f"problem: refusing {key}: owned by {other_user.name} (uid {other_user.uid}), not by you (root); "
                    "only files that are yours or root's are trusted")
    else:
        key.chmod(0o644)
        expected = f"problem: refusing {key}: readable by others (mode 0644); chmod 600 {key}"
    status, lines = check_system(setup, other_user, capsys)
    assert status == 1
    assert problems(lines) == [expected], lines


def test_system_mode_notes_root_and_refuses_authorized_keys(
    setup: Setup, other_user: User, user_keys: Path, capsys: pytest.CaptureFixture
) -> None:
    status, lines = check_system(setup, other_user, capsys, "--user", "root", "--authorized-keys", str(setup.authorized))
    assert status == 1
    assert problems(lines) == [
        f"problem: --authorized-keys {setup.authorized} is for single-user mode: a system agent reads each user's "
        "own ~/.pydra/authorized_keys; leave it out"
    ], lines
    root_home = Path(os.path.expanduser("~root"))
    assert f"note: {root_home}/.pydra/authorized_keys is ignored: user 'root' has uid 0: a system agent never runs " \
           "a command as root" in lines, lines
    assert f"ok: 1 user may launch here: {other_user.name}" in lines, lines


def test_system_mode_needs_root(setup: Setup, other_user: User) -> None:
    with reachable_by_others(sys.executable):
        done = subprocess.run(
            pydra("node", "--check", "--system", "--listen", f"{HOST}:{setup.port}"),
            user=other_user.uid, group=other_user.gid, extra_groups=[], cwd="/", capture_output=True, text=True,
            env={"PATH": "/usr/bin:/bin", "HOME": str(other_user.home)}, timeout=60, start_new_session=True,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "problem: pydra node --check --system must run as root, as the agent does: only root may read its host key, "
        "and each user's authorized_keys as that user; run it with sudo",
        "pydra node --check: 1 problem",
    ], done.stdout + done.stderr
