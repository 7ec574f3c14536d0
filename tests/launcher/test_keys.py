"""Tests for pydra.launcher.keys, including interchange with the real ssh-keygen."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pydra.launcher import keys
from pydra.strictmodes import StrictModeError

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen is not installed")


@pytest.fixture(autouse=True)
def pydra_home(tmp_path, monkeypatch):
    """Keep every test away from the real ~/.pydra."""
    home = tmp_path / "pydra-home"
    monkeypatch.setenv("PYDRA_HOME", str(home))
    return home


def ssh_keygen(*args: str) -> str:
    result = subprocess.run(
        [SSH_KEYGEN, *args], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
    )
    return result.stdout


def ssh_keygen_new_key(path: Path, comment: str, passphrase: str = "") -> None:
    ssh_keygen("-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path))


# --- the Pydra home directory -------------------------------------------------


def test_pydra_home_follows_environment_variable(pydra_home):
    assert keys.pydra_home() == pydra_home
    assert keys.identity_path() == pydra_home / "id_ed25519"
    assert keys.host_key_path() == pydra_home / "host_ed25519"


def test_pydra_home_defaults_to_dot_pydra(tmp_path, monkeypatch):
    monkeypatch.delenv("PYDRA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keys.pydra_home() == tmp_path / ".pydra"


# --- keys made by Pydra -------------------------------------------------------


def test_generated_key_round_trips(tmp_path):
    path = tmp_path / "id"
    line = keys.generate_keypair(path, "alice@box")
    private_key = keys.load_private_key(path)
    public_key = keys.load_public_key(tmp_path / "id.pub")
    assert keys.public_key_bytes(private_key) == keys.public_key_bytes(public_key)
    assert len(keys.public_key_bytes(public_key)) == 32
    assert line == keys.fingerprint(public_key, "alice@box")
    assert line.startswith("256 SHA256:") and line.endswith(" alice@box (ED25519)")


def test_generated_files_have_safe_modes_even_with_umask_zero(tmp_path):
    old_umask = os.umask(0)
    try:
        keys.generate_keypair(tmp_path / "keys" / "id")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "keys" / "id").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "id.pub").stat().st_mode & 0o777 == 0o644


def test_generate_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "id"
    first = keys.generate_keypair(path)
    with pytest.raises(FileExistsError, match="refusing to replace"):
        keys.generate_keypair(path)
    assert keys.fingerprint(keys.load_public_key(tmp_path / "id.pub")) == first
    second = keys.generate_keypair(path, overwrite=True)
    assert second != first
    assert keys.fingerprint(keys.load_private_key(path).public_key()) == second


def test_overwriting_a_loose_file_leaves_a_private_one(tmp_path):
    path = tmp_path / "id"
    path.write_text("old")
    path.chmod(0o644)
    keys.generate_keypair(path, overwrite=True)
    assert path.stat().st_mode & 0o777 == 0o600


def test_passphrase_protected_key_round_trips(tmp_path):
    pytest.importorskip("bcrypt")
    path = tmp_path / "id"
    keys.generate_keypair(path, "enc", passphrase="correct horse")
    assert "aes256-ctr" not in path.read_text()  # the cipher name is base64 inside the armour
    key = keys.load_private_key(path, "correct horse")
    assert keys.public_key_bytes(key) == keys.public_key_bytes(keys.load_public_key(f"{path}.pub"))
    with pytest.raises(keys.KeyFileError, match="wrong passphrase"):
        keys.load_private_key(path, "wrong")
    with pytest.raises(keys.KeyFileError, match="protected by a passphrase"):
        keys.load_private_key(path)


def test_missing_bcrypt_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # makes `import bcrypt` fail
    with pytest.raises(ImportError, match=r"pip install pydra-mpi\[bcrypt\]"):
        keys.generate_keypair(tmp_path / "id", passphrase="secret")


def test_group_or_world_readable_private_key_is_refused(tmp_path):
    path = tmp_path / "id"
    keys.generate_keypair(path)
    path.chmod(0o640)
    with pytest.raises(StrictModeError) as raised:
        keys.load_private_key(path)
    assert str(raised.value) == f"refusing {path}: readable by its group (mode 0640); chmod 600 {path}"


def test_load_public_key_accepts_a_line(tmp_path):
    keys.generate_keypair(tmp_path / "id", "c")
    line = (tmp_path / "id.pub").read_text()
    assert keys.public_key_bytes(keys.load_public_key(line)) == keys.public_key_bytes(
        keys.load_public_key(tmp_path / "id.pub")
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ("ssh-ed25519 AAAA!!!", "not valid base64"),
        ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ", "ssh-rsa keys are not supported"),
        # A valid blob of the wrong type: the text says ed25519 but the data says ssh-rsa.
        ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQAB", "holds a ssh-rsa key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAAQA=", "32 bytes, got 1"),
    ],
)
def test_bad_public_key_lines_are_rejected(line, message):
    with pytest.raises(keys.KeyFileError, match=message):
        keys.load_public_key(line)


def test_not_a_private_key_is_rejected(tmp_path):
    path = tmp_path / "id"
    path.write_text("hello\n")
    path.chmod(0o600)
    with pytest.raises(keys.KeyFileError, match="not an OpenSSH private key"):
        keys.load_private_key(path)


def test_public_key_bytes_checks_raw_length():
    with pytest.raises(ValueError, match="32 bytes"):
        keys.public_key_bytes(b"short")


# --- interchange with ssh-keygen ----------------------------------------------


@needs_ssh_keygen
def test_ssh_keygen_reads_pydra_keys(tmp_path):
    path = tmp_path / "id"
    line = keys.generate_keypair(path, "alice@box")
    assert ssh_keygen("-y", "-f", str(path)) == (tmp_path / "id.pub").read_text()
    assert ssh_keygen("-lf", str(path)).strip() == line
    assert ssh_keygen("-lf", f"{path}.pub").strip() == line


@needs_ssh_keygen
def test_ssh_keygen_reads_pydra_keys_with_passphrase(tmp_path):
    pytest.importorskip("bcrypt")
    path = tmp_path / "id"
    keys.generate_keypair(path, "enc", passphrase="pw")
    assert ssh_keygen("-y", "-P", "pw", "-f", str(path)) == (tmp_path / "id.pub").read_text()
    with pytest.raises(subprocess.CalledProcessError):
        ssh_keygen("-y", "-P", "wrong", "-f", str(path))


@needs_ssh_keygen
def test_pydra_reads_ssh_keygen_keys(tmp_path):
    path = tmp_path / "id"
    ssh_keygen_new_key(path, "bob@laptop")
    key = keys.load_private_key(path)
    public_key = keys.load_public_key(tmp_path / "id.pub")
    assert keys.public_key_bytes(key) == keys.public_key_bytes(public_key)
    assert keys.fingerprint(public_key, "bob@laptop") == ssh_keygen("-lf", str(path)).strip()


@needs_ssh_keygen
def test_pydra_reads_ssh_keygen_keys_with_passphrase(tmp_path):
    pytest.importorskip("bcrypt")
    path = tmp_path / "id"
    ssh_keygen_new_key(path, "bob@laptop", passphrase="s3cret")
    key = keys.load_private_key(path, "s3cret")
    assert keys.public_key_bytes(key) == keys.public_key_bytes(keys.load_public_key(f"{path}.pub"))
    with pytest.raises(keys.KeyFileError, match="wrong passphrase"):
        keys.load_private_key(path, "nope")


@needs_ssh_keygen
def test_other_ssh_keygen_ciphers_get_a_fix_hint(tmp_path):
    path = tmp_path / "id"
    ssh_keygen_new_key(path, "x", passphrase="pw")
    ssh_keygen("-p", "-P", "pw", "-N", "pw", "-Z", "aes128-cbc", "-f", str(path))
    with pytest.raises(keys.KeyFileError, match="ssh-keygen -p -Z aes256-ctr"):
        keys.load_private_key(path, "pw")


@needs_ssh_keygen
@pytest.mark.parametrize("comment", ["alice@box", "two words", ""])
def test_keygen_list_matches_ssh_keygen(tmp_path, capsys, comment):
    path = tmp_path / "id"
    ssh_keygen_new_key(path, comment)
    for target in (f"{path}.pub", str(path)):
        assert keys.keygen_main(["-l", "-f", target]) == 0
        printed = capsys.readouterr().out
        if comment or target.endswith(".pub"):  # ssh-keygen shows a file name otherwise
            assert printed == ssh_keygen("-lf", target)


@needs_ssh_keygen
def test_keygen_list_reads_comment_inside_private_key(tmp_path, capsys):
    path = tmp_path / "id"
    ssh_keygen_new_key(path, "inside")
    (tmp_path / "id.pub").unlink()
    assert keys.keygen_main(["-l", "-f", str(path)]) == 0
    assert capsys.readouterr().out == ssh_keygen("-lf", str(path))


# --- the `pydra keygen` command ---------------------------------------------


def test_keygen_writes_default_identity(pydra_home, capsys):
    assert keys.keygen_main(["-C", "me@here"]) == 0
    out = capsys.readouterr().out
    public_key = keys.load_public_key(pydra_home / "id_ed25519.pub")
    assert keys.fingerprint(public_key, "me@here") in out
    assert str(pydra_home / "id_ed25519") in out
    assert (pydra_home / "id_ed25519").stat().st_mode & 0o777 == 0o600


def test_keygen_refuses_existing_key_without_force(tmp_path, capsys):
    path = str(tmp_path / "id")
    assert keys.keygen_main(["-f", path, "-C", "x"]) == 0
    capsys.readouterr()
    assert keys.keygen_main(["-f", path, "-C", "x"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--force" in error and path in error
    assert keys.keygen_main(["-f", path, "-C", "x", "--force"]) == 0


def test_keygen_refuses_a_directory_even_with_force(tmp_path, capsys):
    for extra in ([], ["--force"]):
        assert keys.keygen_main(["-f", str(tmp_path), *extra]) == 2
        assert capsys.readouterr().err == f"pydra keygen: {tmp_path} is a directory; give the key's file name\n"
    assert list(tmp_path.iterdir()) == []


def test_keygen_list_of_missing_file_is_bad_input(tmp_path, capsys):
    assert keys.keygen_main(["-l", "-f", str(tmp_path / "nope")]) == 2
    error = capsys.readouterr().err
    assert error == f"pydra keygen: {tmp_path / 'nope'}: No such file or directory\n"


def test_keygen_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        keys.keygen_main(["--bogus"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--bogus" in error


def test_keygen_failure_to_write_exits_1(tmp_path, capsys):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert keys.keygen_main(["-f", str(not_a_directory / "id")]) == 1
    assert capsys.readouterr().err == f"pydra keygen: {not_a_directory}: File exists\n"
