"""Tests for pydra.launcher.authorized: authorized_keys and known_hosts."""

import base64
import hashlib
import hmac
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pydra.launcher import keys
from pydra.launcher.authorized import (
    AuthorizationError,
    HostKeyChanged,
    RevokedHostKey,
    UnknownHostKey,
    authorize,
    check_host,
    known_hosts_path,
    read_authorized_keys,
)
from pydra.launcher.keys import KeyFileError

SSH_KEYGEN = shutil.which("ssh-keygen")
RSA_LINE = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ old-laptop"


@pytest.fixture(autouse=True)
def pydra_home(tmp_path, monkeypatch):
    """Keep every test away from the real ~/.pydra."""
    home = tmp_path / "pydra-home"
    monkeypatch.setenv("PYDRA_HOME", str(home))
    return home


def new_key() -> bytes:
    return keys.public_key_bytes(Ed25519PrivateKey.generate())


def key_line(key: bytes, comment: str = "user") -> str:
    return keys.public_key_line(key, comment)


@pytest.fixture
def alice():
    return new_key()


@pytest.fixture
def write_authorized(tmp_path):
    path = tmp_path / "authorized_keys"

    def write(*lines: str):
        path.write_text("".join(line + "\n" for line in lines))
        return path

    return write


# --- authorized_keys: reading ---------------------------------------------


def test_reads_keys_comments_and_blank_lines(write_authorized, alice):
    bob = new_key()
    path = write_authorized("# who may launch", "", key_line(alice, "alice@laptop"), key_line(bob))
    entries, warnings = read_authorized_keys(path)
    assert [entry.public_key for entry in entries] == [alice, bob]
    assert entries[0].comment == "alice@laptop"
    assert entries[0].roles == {"launch"}
    assert entries[0].allowed_from is None and entries[0].expires is None
    assert entries[1].location == f"{path}:4"
    assert warnings == []


def test_default_path_is_in_pydra_home(pydra_home, alice):
    pydra_home.mkdir()
    (pydra_home / "authorized_keys").write_text(key_line(alice) + "\n")
    assert read_authorized_keys()[0][0].public_key == alice
    assert authorize(alice, "10.0.0.1", "launch").public_key == alice


def test_other_key_types_are_skipped_with_a_warning(write_authorized, alice):
    path = write_authorized(RSA_LINE, f'from="10.*" {RSA_LINE}', key_line(alice))
    entries, warnings = read_authorized_keys(path)
    assert [entry.public_key for entry in entries] == [alice]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{path}:1: ") and "ssh-rsa" in warnings[0]


def test_quoted_option_values_may_hold_commas_and_spaces(write_authorized, alice):
    path = write_authorized(
        f'from="10.0.0.0/8, !10.0.0.5",Pydra-Role="launch,admin" {key_line(alice)}'
    )
    [entry], _ = read_authorized_keys(path)
    assert entry.allowed_from == ("10.0.0.0/8", "!10.0.0.5")
    assert entry.roles == {"launch", "admin"}


def test_roles_may_be_separated_by_a_bar(write_authorized, alice):
    path = write_authorized(f'pydra-role="admin|launch" {key_line(alice)}')
    [entry], _ = read_authorized_keys(path)
    assert entry.roles == {"launch", "admin"}


def test_escaped_quote_inside_a_value(write_authorized, alice):
    # No such option is supported, but the quote must not end the value early.
    path = write_authorized(f'command="echo \\"hi, there\\"" {key_line(alice)}')
    entries, [warning] = read_authorized_keys(path)
    assert entries == [] and "unsupported option 'command'" in warning


@pytest.mark.parametrize(
    "options, message",
    [
        ("no-pty", "unsupported option 'no-pty'"),
        ('from="10.0.0.1', "missing its closing quote"),
        ("from=10.0.0.1", "must be in double quotes"),
        ('from="10.0.0.1/8"', "not a network"),
        ('from="10.0.0.1,,10.0.0.2"', "empty pattern"),
        ("from", "needs a value"),
        ('from="a",from="b"', "given twice"),
        ('pydra-role="root"', "unknown pydra-role 'root'"),
        ('expiry-time="2026"', "expiry-time must be YYYYMMDD"),
        ('expiry-time="20261340"', "not a valid date"),
        ('from="a";', "expected ',' or a space"),
    ],
)
def test_malformed_options_skip_only_their_line_and_name_it(write_authorized, alice, options, message):
    bob = new_key()
    path = write_authorized("# header", f"{options} {key_line(alice)}", key_line(bob))
    entries, [warning] = read_authorized_keys(path)
    assert [entry.public_key for entry in entries] == [bob]  # the line after the bad one still counts
    assert warning.startswith(f"{path}:2: skipped: ") and message in warning
    with pytest.raises(AuthorizationError, match=f"only on {path}:2, which is skipped: .*{re.escape(message)}"):
        authorize(alice, "10.0.0.1", "launch", path=path)
    assert authorize(bob, "10.0.0.1", "launch", path=path).public_key == bob


def test_malformed_key_names_the_line(write_authorized, alice):
    path = write_authorized("ssh-ed25519 AAAAnot-base64", key_line(alice))
    entries, [warning] = read_authorized_keys(path)
    assert [entry.public_key for entry in entries] == [alice]
    assert re.match(f"{re.escape(str(path))}:1: skipped: .*base64", warning)


def test_options_separated_by_spaces_skip_the_line_and_say_why(write_authorized, alice):
    # The README once showed this; taking pydra-role alone would have dropped from= and expiry-time.
    path = write_authorized(f'pydra-role="launch" from="10.1.0.0/16" expiry-time="20271231" {key_line(alice)}')
    entries, [warning] = read_authorized_keys(path)
    assert entries == []
    assert warning.startswith(f"{path}:1: skipped: options must be separated by commas, not spaces")
    reason = "options must be separated by commas"
    with pytest.raises(AuthorizationError, match=f"is only on {path}:1, which is skipped: {reason}"):
        authorize(alice, "10.1.2.3", "launch", path=path)


def test_the_same_options_separated_by_commas_work(write_authorized, alice):
    path = write_authorized(f'pydra-role="launch",from="10.1.0.0/16",expiry-time="20271231" {key_line(alice)}')
    [entry], warnings = read_authorized_keys(path)
    assert warnings == [] and entry.allowed_from == ("10.1.0.0/16",) and entry.roles == {"launch"}
    now = datetime(2027, 6, 1)
    assert authorize(alice, "10.1.2.3", "launch", now, path=path) == entry
    with pytest.raises(AuthorizationError, match="not allowed from 10.2.0.1"):
        authorize(alice, "10.2.0.1", "launch", now, path=path)
    with pytest.raises(AuthorizationError, match="expired"):
        authorize(alice, "10.1.2.3", "launch", datetime(2028, 1, 1), path=path)


def test_a_line_that_is_not_utf8_skips_only_itself(tmp_path, alice):
    path = tmp_path / "authorized_keys"
    path.write_bytes(b"\xff\xfe garbage\n" + key_line(alice).encode() + b"\n")
    entries, [warning] = read_authorized_keys(path)
    assert [entry.public_key for entry in entries] == [alice] and warning == f"{path}:1: skipped: not valid UTF-8"


ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = [ROOT / "README.md", ROOT / "hostfiles" / "three-loopback-hosts.txt"]


def test_every_documented_authorized_keys_line_is_accepted_whole(tmp_path):
    """The README once showed a line the parser skips; every example must now be read without a warning."""
    path = tmp_path / "authorized_keys"
    examples = [line for doc in DOCUMENTED for line in re.findall(r"(?:^#[ \t]+|`)([^`\n]*ssh-ed25519 AAAA\.\.\.[^`\n]*)", doc.read_text(), re.M)]
    assert len(examples) == len(DOCUMENTED), examples
    for example in examples:
        path.write_text(example.replace("AAAA...", key_line(new_key()).split()[1]) + "\n")
        entries, warnings = read_authorized_keys(path)
        assert warnings == [] and len(entries) == 1 and entries[0].allowed_from, example

    entries, warnings = read_authorized_keys(ROOT / "hostfiles" / "authorized_keys.example")
    assert warnings == [] and len(entries) == 4
    assert {"launch", "admin"} in [entry.roles for entry in entries]


# --- authorized_keys: authorizing -----------------------------------------


def test_key_not_listed_is_refused_with_its_fingerprint(write_authorized, alice):
    path = write_authorized(key_line(new_key()))
    with pytest.raises(AuthorizationError) as raised:
        authorize(alice, "10.0.0.1", "launch", path=path)
    assert str(raised.value) == f"key {keys.sha256_fingerprint(alice)} is not in {path}"


def test_missing_file_refuses_every_key(tmp_path, alice):
    with pytest.raises(AuthorizationError, match="the file does not exist"):
        authorize(alice, "10.0.0.1", "launch", path=tmp_path / "absent")


def test_default_role_is_launch_only(write_authorized, alice):
    path = write_authorized(key_line(alice))
    assert authorize(alice, "10.0.0.1", "launch", path=path).public_key == alice
    with pytest.raises(AuthorizationError, match=f"lacks role admin .*{path}:1"):
        authorize(alice, "10.0.0.1", "admin", path=path)


def test_admin_role_does_not_imply_launch(write_authorized, alice):
    path = write_authorized(f'pydra-role="admin" {key_line(alice)}')
    authorize(alice, "10.0.0.1", "admin", path=path)
    with pytest.raises(AuthorizationError, match="lacks role launch"):
        authorize(alice, "10.0.0.1", "launch", path=path)


def test_unknown_requested_role_is_a_programming_error(write_authorized, alice):
    with pytest.raises(ValueError, match="unknown role"):
        authorize(alice, "10.0.0.1", "root", path=write_authorized(key_line(alice)))


@pytest.mark.parametrize(
    "patterns, address, allowed",
    [
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "192.168.0.1", False),
        ("10.0.0.0/8,!10.0.0.5", "10.0.0.5", False),
        ("!10.0.0.5,10.0.0.0/8", "10.0.0.6", True),
        ("!10.0.0.5", "10.0.0.6", False),  # a negation alone allows nothing
        ("10.0.0.5", "10.0.0.5", True),
        ("192.168.1.?", "192.168.1.7", True),
        ("192.168.1.?", "192.168.1.17", False),
        ("10.1.*", "10.1.200.3", True),
        ("*", "10.9.9.9", True),
        ("127.0.0.0/8", "::ffff:127.0.0.1", True),  # IPv4 seen through an IPv6 socket
        ("fd00::/8", "fd12::1", True),
        ("fd12::*", "fd12::1", True),
        ("fd00::/8", "10.0.0.1", False),
    ],
)
def test_from_patterns(write_authorized, alice, patterns, address, allowed):
    path = write_authorized(f'from="{patterns}" {key_line(alice)}')
    if allowed:
        authorize(alice, address, "launch", path=path)
    else:
        with pytest.raises(AuthorizationError, match=f"is not allowed from {address}"):
            authorize(alice, address, "launch", path=path)


@pytest.mark.parametrize("patterns", ["*.cluster.example", "10.0.0.0/8,!login1", "node0?", "localhost"])
def test_from_host_names_are_refused_at_load(write_authorized, alice, patterns):
    path = write_authorized(f'from="{patterns}" {key_line(alice)}')
    entries, warnings = read_authorized_keys(path)
    assert entries == []
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:1: skipped: from= host name ")
    assert "is not supported" in warnings[0]
    # The key is refused everywhere, even from an address the rest of the pattern allows.
    with pytest.raises(AuthorizationError, match="which is skipped: from= host name"):
        authorize(alice, "10.0.0.1", "launch", path=path)


def test_expiry_time_in_local_time(write_authorized, alice):
    path = write_authorized(f'expiry-time="202601011230" {key_line(alice)}')
    before = datetime(2026, 1, 1, 12, 29, 59)
    after = datetime(2026, 1, 1, 12, 30, 0)
    authorize(alice, "10.0.0.1", "launch", now=before, path=path)
    with pytest.raises(AuthorizationError, match="expired on 2026-01-01 12:30:00"):
        authorize(alice, "10.0.0.1", "launch", now=after, path=path)


def test_expiry_date_only_and_aware_now(write_authorized, alice):
    path = write_authorized(f'expiry-time="20260101" {key_line(alice)}')
    expiry = datetime(2026, 1, 1).astimezone()
    with pytest.raises(AuthorizationError, match="expired on 2026-01-01 "):
        authorize(alice, "10.0.0.1", "launch", now=expiry.astimezone(timezone.utc), path=path)
    authorize(alice, "10.0.0.1", "launch", now=expiry - timedelta(seconds=1), path=path)


def test_expired_key_is_refused_now(write_authorized, alice):
    path = write_authorized(f'expiry-time="20000101" {key_line(alice)}')
    with pytest.raises(AuthorizationError, match="expired on 2000-01-01"):
        authorize(alice, "10.0.0.1", "launch", path=path)


def test_any_line_of_a_key_may_allow_it(write_authorized, alice):
    path = write_authorized(
        f'from="10.0.0.0/8" {key_line(alice)}',
        f'from="192.168.0.0/16",pydra-role="admin" {key_line(alice)}',
    )
    assert authorize(alice, "192.168.1.1", "admin", path=path).location == f"{path}:2"
    with pytest.raises(AuthorizationError, match=f"not allowed from 172.16.0.1 .*{path}:1"):
        authorize(alice, "172.16.0.1", "launch", path=path)


# --- known_hosts ------------------------------------------------------------


def test_unknown_host_is_refused(tmp_path):
    path = tmp_path / "known_hosts"
    key = new_key()
    with pytest.raises(UnknownHostKey) as raised:
        check_host("node01", 7470, key, path=path)
    assert keys.sha256_fingerprint(key) in str(raised.value)
    assert str(raised.value).endswith(", then accept it (--accept-new)")  # it said how to check, not how to accept
    assert not path.exists()


def test_accept_new_appends_and_then_trusts(pydra_home):
    key = new_key()
    check_host("Node01", 7470, key, accept_new=True)
    check_host("node02", 7000, key, accept_new=True)
    lines = known_hosts_path().read_text().splitlines()
    assert lines == [f"node01 {key_line(key, '')}", f"[node02]:7000 {key_line(key, '')}"]
    check_host("node01", 7470, key)
    check_host("node02", 7000, key)
    with pytest.raises(UnknownHostKey):
        check_host("node02", 7470, key)  # the default port is a different entry


def test_accept_new_keeps_lines_separate(tmp_path):
    path = tmp_path / "known_hosts"
    old = new_key()
    path.write_text(f"node01 {key_line(old)}")  # no final newline
    check_host("node02", 7470, new_key(), accept_new=True, path=path)
    assert len(path.read_text().splitlines()) == 2
    check_host("node01", 7470, old, path=path)


def test_changed_key_is_refused_loudly_even_with_accept_new(tmp_path):
    path = tmp_path / "known_hosts"
    old, new = new_key(), new_key()
    path.write_text(f"# nodes\nnode01,10.0.0.1 {key_line(old)}\n")
    before = path.read_text()
    with pytest.raises(HostKeyChanged) as raised:
        check_host("10.0.0.1", 7470, new, accept_new=True, path=path)
    message = str(raised.value)
    assert "WARNING" in message and "CHANGED" in message
    assert keys.sha256_fingerprint(old) in message and keys.sha256_fingerprint(new) in message
    assert f"{path}:2" in message
    assert path.read_text() == before


def test_host_patterns_with_wildcards_and_negation(tmp_path):
    path = tmp_path / "known_hosts"
    key = new_key()
    path.write_text(f"node*,!node13 {key_line(key)}\n[gpu?]:7000 {key_line(key)}\n")
    check_host("node01", 7470, key, path=path)
    check_host("gpu1", 7000, key, path=path)
    with pytest.raises(UnknownHostKey):
        check_host("node13", 7470, key, path=path)


def test_other_key_types_do_not_count(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(f"node01 {RSA_LINE}\n")
    with pytest.raises(UnknownHostKey):
        check_host("node01", 7470, new_key(), path=path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("node01", "expected 'ssh-ed25519"),
        ("@cert-authority *.lab ssh-ed25519 AAAA", "the marker @cert-authority is not supported"),
        ("@revoked node01", "expected 'ssh-ed25519"),
        ("|1|!!|!! " + keys.public_key_line(bytes(32)), "malformed hashed host name"),
    ],
)
def test_malformed_known_hosts_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "known_hosts"
    path.write_text(f"\n{line}\n")
    with pytest.raises(KeyFileError, match=message) as raised:
        check_host("node01", 7470, new_key(), path=path)
    assert str(raised.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("revoked_first", [True, False])
def test_a_revoked_key_is_refused_even_where_another_line_trusts_it(tmp_path, revoked_first):
    key = new_key()
    lines = [f"@revoked * {key_line(key)}", f"node01 {key_line(key)}"]
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines if revoked_first else lines[::-1]) + "\n")
    with pytest.raises(RevokedHostKey) as raised:
        check_host("node01", 7470, key, path=path)
    message = str(raised.value)
    number = 1 if revoked_first else 2
    assert message == (f"the host key of node01 ({keys.sha256_fingerprint(key)}) is revoked by {path}:{number}; "
                       "pydra will not connect to it")


def test_revocation_follows_the_host_patterns(tmp_path):
    key, other = new_key(), new_key()
    path = tmp_path / "known_hosts"
    path.write_text(f"@revoked node02,[node03]:7000 {key_line(key)}\nnode0? {key_line(key)}\n"
                    f"node04 {key_line(other)}\n")
    check_host("node01", 7470, key, path=path)  # revoked for other hosts only
    with pytest.raises(RevokedHostKey):
        check_host("node02", 7470, key, path=path)
    with pytest.raises(RevokedHostKey):
        check_host("node03", 7000, key, path=path)
    check_host("node04", 7470, other, path=path)  # a revoked key does not taint the others


def test_a_revoked_key_is_not_accepted_as_new(tmp_path):
    key = new_key()
    path = tmp_path / "known_hosts"
    path.write_text(f"@revoked * {key_line(key)}\n")
    with pytest.raises(RevokedHostKey):
        check_host("node09", 7470, key, accept_new=True, path=path)
    assert path.read_text() == f"@revoked * {key_line(key)}\n"


def test_a_revoked_line_may_hash_its_host(tmp_path):
    salt = bytes(range(20))
    digest = hmac.new(salt, b"node01", hashlib.sha1).digest()
    field = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    key = new_key()
    path = tmp_path / "known_hosts"
    path.write_text(f"node01 {key_line(key)}\n@revoked {field} {key_line(key)}\n")
    with pytest.raises(RevokedHostKey, match=f"{path}:2"):
        check_host("node01", 7470, key, path=path)


def test_hashed_host_name(tmp_path):
    # |1|base64(salt)|base64(HMAC-SHA1(salt, name)), as OpenSSH's HashKnownHosts writes.
    salt = bytes(range(20))
    digest = hmac.new(salt, b"[node01]:7000", hashlib.sha1).digest()
    field = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    path = tmp_path / "known_hosts"
    key = new_key()
    path.write_text(f"{field} {key_line(key)}\n")
    check_host("node01", 7000, key, path=path)
    with pytest.raises(UnknownHostKey):
        check_host("node01", 7470, key, path=path)


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen is not installed")
def test_hashed_host_names_from_ssh_keygen(tmp_path):
    path = tmp_path / "known_hosts"
    key, other = new_key(), new_key()
    path.write_text(f"node01 {key_line(key)}\n[node02]:7000 {key_line(other)}\n")
    subprocess.run([SSH_KEYGEN, "-H", "-f", str(path)], check=True, capture_output=True)
    assert "node0" not in path.read_text()  # really hashed
    check_host("node01", 7470, key, path=path)
    check_host("node02", 7000, other, path=path)
    with pytest.raises(HostKeyChanged):
        check_host("node01", 7470, other, path=path)
    with pytest.raises(UnknownHostKey):
        check_host("node03", 7470, key, path=path)
