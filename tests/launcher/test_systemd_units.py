"""The systemd units in ``deploy/systemd/``: systemd accepts them, and ``pydra node`` takes the user unit's command line.

``systemd-analyze verify --user`` needs no running systemd, only a runtime
directory; a broken copy of the unit shows that its complaints are seen. The
unit's ``ExecStart``, expanded for a home directory with keys and a
``node.env``, runs as ``pydra node --check`` with exit 0.

The system unit's ``ExecStart`` runs with ``--check`` as root, as systemd
would run it, with this venv's ``pydra`` for ``/usr/local/bin/pydra``. As
written, it checks the system agent's own host key, ``/etc/pydra/host_ed25519``,
and address, ``0.0.0.0:7470``: the check looks where the agent would (the
test does not judge this machine's ``/etc``). Then with the two choices the
unit leaves to each host replaced by options appended to its line, a host key
at a test path and a free loopback port, and a second local user whose
``authorized_keys`` lets a key launch, it passes with exit 0.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from agentkit import free_port, keygen
from testkit import mpi_environment, run_process
from unitkit import SYSTEM_UNIT, USER_UNIT, directives, exec_start
from userkit import User, authorize, other_user  # noqa: F401  (other_user is a fixture the tests ask for)

HOST = "127.0.0.2"


def user_home(root: Path) -> Path:
    """A home directory with Pydra installed where the unit expects it (this test's own)."""
    home = root / "home"
    bin_dir = home / "pydra" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pydra").symlink_to(Path(sys.executable).parent / "pydra")
    return home


def verify(unit: Path, home: Path, root: Path, *scope: str) -> str:
    """What ``systemd-analyze verify`` (default ``--user``) says about *unit* (nothing if all is well)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    runtime = root / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    done = run_process([analyze, "verify", *(scope or ["--user"]), str(unit)], timeout=60, env=env, cwd=root)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}" if done.returncode or done.stdout or done.stderr else ""


def test_systemd_accepts_the_user_unit(tmp_path: Path) -> None:
    home = user_home(tmp_path)
    assert verify(USER_UNIT, home, tmp_path) == ""
    broken = tmp_path / "pydra-node.service"  # the same unit with a misspelt directive: verify must say so
    broken.write_text(USER_UNIT.read_text().replace("RestartSec=", "RestartSecs="))
    assert "Unknown key 'RestartSecs'" in verify(broken, home, tmp_path)


def test_the_units_command_line_is_what_pydra_node_takes(tmp_path: Path) -> None:
    home = user_home(tmp_path)
    keygen(home / ".pydra" / "host_ed25519", HOST)
    keygen(tmp_path / "user" / "id_ed25519", "user@launcher")
    (home / ".pydra" / "authorized_keys").write_text((tmp_path / "user" / "id_ed25519.pub").read_text())
    port = free_port(HOST)
    (home / ".pydra" / "node.env").write_text(f"NODE_LISTEN={HOST}:{port}\n")
    argv = exec_start(USER_UNIT, home)
    assert argv[:2] == [str(home / "pydra" / ".venv" / "bin" / "pydra"), "node"], argv
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYDRA_")}
    done = run_process([*argv, "--check"], timeout=60, env={**env, "HOME": str(home)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok: {HOST}:{port} is free to listen on" in done.stdout.splitlines(), done.stdout
    assert f"ok: {home}/.pydra/authorized_keys: 1 key may launch" in done.stdout.splitlines(), done.stdout
    service = dict(directives(USER_UNIT, "Service"))
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # the agent rereads authorized_keys on SIGHUP
    assert service["Restart"] == "on-failure"


def test_systemd_accepts_the_system_unit(tmp_path: Path) -> None:
    # The unit names /usr/local/bin/pydra, which systemd checks exists: verify a copy naming this venv's.
    text = SYSTEM_UNIT.read_text()
    assert "ExecStart=/usr/local/bin/pydra node --system " in text
    unit = tmp_path / SYSTEM_UNIT.name
    unit.write_text(text.replace("/usr/local/bin/pydra", str(Path(sys.executable).parent / "pydra")))
    assert verify(unit, tmp_path, tmp_path, "--system") == ""


def test_the_system_units_command_line_is_what_pydra_node_takes(tmp_path: Path, other_user: User) -> None:
    argv = exec_start(SYSTEM_UNIT, Path("/nonexistent"))  # a system unit has no %h
    assert argv[:3] == ["/usr/local/bin/pydra", "node", "--system"], argv
    argv[0] = str(Path(sys.executable).parent / "pydra")  # where this test's pydra is installed
    env = {name: value for name, value in mpi_environment().items() if not name.startswith("PYDRA_")}
    as_written = run_process([*argv, "--check"], timeout=120, env=env)
    assert as_written.returncode in (0, 1), as_written.stdout + as_written.stderr
    checked = as_written.stdout.splitlines()
    assert any(line.split(": ", 1)[1].startswith(("host key /etc/pydra/host_ed25519 ", "refusing /etc/pydra/host_ed25519:"))
               for line in checked), as_written.stdout
    assert any("0.0.0.0:7470" in line for line in checked), as_written.stdout
    assert not any("authorized_keys" in line and "single-user" in line for line in checked), as_written.stdout

    host_key = tmp_path / "etc-pydra" / "host_ed25519"
    keygen(host_key, HOST)  # root's, 0600, in a directory of root's
    keygen(tmp_path / "launcher" / "id_ed25519", "user@launcher")
    user_keys = authorize(other_user, f'pydra-role="launch" {(tmp_path / "launcher" / "id_ed25519.pub").read_text().strip()}')
    port = free_port(HOST)
    try:
        done = run_process([*argv, "--check", "--host-key", str(host_key), "--listen", f"{HOST}:{port}",
                            "--user", other_user.name], timeout=120, env=env)
    finally:
        shutil.rmtree(user_keys.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"ok: host key {host_key} (SHA256:") for line in lines), done.stdout
    assert f"ok: {user_keys}: 1 key may launch as {other_user.name}" in lines, done.stdout
    assert f"ok: {HOST}:{port} is free to listen on" in lines, done.stdout
    assert lines[-1] == "pydra node --check: all is well", done.stdout
