"""pydra.strictmodes: trust files with modes or owners that let someone else write them are refused, in one line.

The files live in a temporary PYDRA_HOME laid out as Pydra lays it out. The
tests about another user's files create a second local user (as root; skipped
otherwise) and remove it at the end, after stopping its processes by pid.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pydra import strictmodes
from pydra.launcher import authorized, keys
from pydra.strictmodes import Kind, StrictModeError
from userkit import User, other_user  # noqa: F401  (other_user is a fixture the tests ask for)

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PYDRA_HOME as Pydra makes it: a key, authorized_keys, known_hosts, a connection file."""
    home = tmp_path / "pydra-home"
    monkeypatch.setenv("PYDRA_HOME", str(home))
    home.mkdir(mode=0o700)
    keys.generate_keypair(home / "id_ed25519", "me")
    (home / "authorized_keys").write_text(keys.public_key_line(keys.load_public_key(home / "id_ed25519.pub")) + "\n")
    (home / "known_hosts").write_text("")
    (home / "run").mkdir(mode=0o700)
    connection = home / "run" / "c1.json"
    connection.write_text('{"pid": 1}')
    connection.chmod(0o600)
    return home


def refusal(path: Path, kind: Kind = Kind.TRUST) -> str:
    """The one line with which reading *path* as *kind* is refused."""
    with pytest.raises(StrictModeError) as raised:
        strictmodes.read_bytes(path, kind)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"refusing {path}: ")
    return message


def test_files_laid_out_as_pydra_makes_them_pass(home: Path) -> None:
    for name in ("authorized_keys", "known_hosts"):
        strictmodes.read_bytes(home / name)
        strictmodes.check_file(home / name)
    keys.load_private_key(home / "id_ed25519")
    strictmodes.read_bytes(home / "run" / "c1.json", Kind.OWN)
    strictmodes.check_directory(home / "run", private=True)
    strictmodes.check_directory(home)


@pytest.mark.parametrize("mode, problem", [(0o666, "writable by others"), (0o664, "writable by its group"),
                                           (0o646, "writable by others"), (0o620, "writable by its group")])
def test_a_trust_file_others_may_write_is_refused(home: Path, mode: int, problem: str) -> None:
    path = home / "authorized_keys"
    path.chmod(mode)
    assert refusal(path) == f"refusing {path}: {problem} (mode {mode:04o}); chmod go-w {path}"
    with pytest.raises(StrictModeError):
        strictmodes.check_file(path)
    with pytest.raises(StrictModeError):  # the agent's and the admin endpoint's reading of it
        authorized.read_authorized_keys(path)


def test_known_hosts_others_may_write_is_refused_and_so_is_a_directory_it_would_be_created_in(home: Path) -> None:
    path = home / "known_hosts"
    path.chmod(0o666)
    with pytest.raises(StrictModeError, match="writable by others"):
        authorized.check_known_hosts(path)
    with pytest.raises(StrictModeError, match="writable by others"):
        authorized.check_host("node1", 7470, b"k" * 32, accept_new=True, path=path)
    assert path.read_text() == ""  # nothing was appended
    path.unlink()
    home.chmod(0o777)
    with pytest.raises(StrictModeError, match=f"refusing {home}: writable by others"):
        authorized.check_known_hosts(path)
    with pytest.raises(StrictModeError):
        authorized.check_host("node1", 7470, b"k" * 32, accept_new=True, path=path)
    assert not path.exists()


@pytest.mark.parametrize("mode, problem", [(0o644, "readable by others"), (0o640, "readable by its group"),
                                           (0o660, "writable by its group"), (0o604, "readable by others")])
def test_a_private_key_others_may_read_is_refused(home: Path, mode: int, problem: str) -> None:
    path = home / "id_ed25519"
    path.chmod(mode)
    assert refusal(path, Kind.SECRET) == f"refusing {path}: {problem} (mode {mode:04o}); chmod 600 {path}"
    with pytest.raises(StrictModeError):
        keys.load_private_key(path)


@pytest.mark.parametrize("mode, problem", [(0o777, "writable by others"), (0o770, "writable by its group"),
                                           (0o1777, "writable by others")])
def test_a_pydra_home_others_may_write_refuses_every_file_in_it(home: Path, mode: int, problem: str) -> None:
    home.chmod(mode)
    expected = f"directory {home} is {problem} (mode {mode:04o}); chmod go-w {home}"
    for name, kind in (("authorized_keys", Kind.TRUST), ("known_hosts", Kind.TRUST), ("id_ed25519", Kind.SECRET),
                       ("run/c1.json", Kind.OWN)):
        assert refusal(home / name, kind) == f"refusing {home / name}: {expected}"
    with pytest.raises(StrictModeError, match=f"refusing {home}: {problem}"):
        strictmodes.check_directory(home)


def test_a_directory_higher_up_that_others_may_write_is_refused_too(home: Path) -> None:
    above = home.parent
    above.chmod(0o757)
    try:
        assert refusal(home / "authorized_keys").endswith(f"directory {above} is writable by others (mode 0757); "
                                                          f"chmod go-w {above}")
    finally:
        above.chmod(0o700)


def test_the_connection_directory_must_be_writable_by_you_alone(home: Path) -> None:
    run = home / "run"
    run.chmod(0o1777)  # sticky, as /tmp: fine above a trust file, not for a directory of connection files
    with pytest.raises(StrictModeError, match=f"refusing {run}: writable by others"):
        strictmodes.check_directory(run, private=True)
    assert "writable by others" in refusal(run / "c1.json", Kind.OWN)
    run.chmod(0o755)
    strictmodes.read_bytes(run / "c1.json", Kind.OWN)  # only you may write it: fine
    (run / "c1.json").chmod(0o620)
    assert refusal(run / "c1.json", Kind.OWN).endswith("writable by its group (mode 0620); "
                                                       f"chmod go-w {run / 'c1.json'}")


def test_a_root_owned_sticky_directory_such_as_tmp_passes_higher_up_but_not_holding_the_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can make a root-owned directory")
    shared = tmp_path / "shared"
    (shared / "mine").mkdir(parents=True)
    shared.chmod(0o1777)
    (shared / "mine" / "authorized_keys").write_text("")
    strictmodes.read_bytes(shared / "mine" / "authorized_keys")
    shared.chmod(0o777)  # without the sticky bit, others could rename "mine" away
    assert f"directory {shared} is writable by others" in refusal(shared / "mine" / "authorized_keys")
    shared.chmod(0o1777)
    (shared / "authorized_keys").write_text("")  # right in it: others could have made the files it lacks
    assert f"directory {shared} is writable by others" in refusal(shared / "authorized_keys")


def test_a_symbolic_link_is_checked_where_it_leads(home: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    target = elsewhere / "authorized_keys"
    target.write_text("")
    link = home / "authorized_keys"
    link.unlink()
    link.symlink_to(target)
    assert refusal(link).endswith(f"directory {elsewhere} is writable by others (mode 0777); chmod go-w {elsewhere}")
    elsewhere.chmod(0o755)
    strictmodes.read_bytes(link)


def test_not_a_regular_file_is_refused(home: Path) -> None:
    with pytest.raises(StrictModeError, match="not a regular file"):
        strictmodes.check_file(home / "run")


# -- another user's files ------------------------------------------------------------------------




def test_files_owned_by_another_user_are_refused(home: Path, other_user: User) -> None:
    user, uid = other_user.name, other_user.uid
    for name, kind in (("authorized_keys", Kind.TRUST), ("known_hosts", Kind.TRUST), ("id_ed25519", Kind.SECRET),
                       ("run/c1.json", Kind.OWN)):
        path = home / name
        os.chown(path, uid, -1)
        assert refusal(path, kind).startswith(f"refusing {path}: owned by {user} (uid {uid}), not by you (root)")
        os.chown(path, 0, -1)
        strictmodes.read_bytes(path, kind)
    os.chown(home / "run", uid, -1)  # another user's directory of connection files
    assert refusal(home / "run" / "c1.json", Kind.OWN).startswith(
        f"refusing {home / 'run' / 'c1.json'}: directory {home / 'run'} is owned by {user} (uid {uid})")
    with pytest.raises(StrictModeError, match=f"owned by {user}"):
        strictmodes.check_directory(home / "run", private=True)


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs a system python3 the second user can run")
def test_for_an_ordinary_user_roots_files_pass_but_a_connection_file_must_be_their_own(
        tmp_path: Path, other_user: User) -> None:
    """As OpenSSH accepts a root-owned authorized_keys; the shell follows only the user's own connection file."""
    user, uid = other_user.name, other_user.uid
    home = other_user.home / ".pydra"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    (home / "authorized_keys").write_text("")  # root's, in the user's own directory
    (home / "c1.json").write_text("{}")  # root's too
    check = (
        "import sys; from pydra import strictmodes as s\n"
        "s.read_bytes(sys.argv[1])\n"
        "try:\n    s.read_bytes(sys.argv[2], s.Kind.OWN)\nexcept s.StrictModeError as e:\n    print(e)\n"
    )
    process = subprocess.Popen(
        [str(SYSTEM_PYTHON), "-c", check, str(home / "authorized_keys"), str(home / "c1.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, user=uid, group=uid, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    assert process.returncode == 0, err
    assert out.strip() == (f"refusing {home / 'c1.json'}: owned by root (uid 0), not by you ({user}); "
                           "only files that are yours are trusted")
