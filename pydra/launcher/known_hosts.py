"""Which nodes to trust: ``known_hosts``, in OpenSSH's syntax.

``known_hosts`` is read by the launcher (``pydra launch`` and
``pydra-remote-exec``).  One node host key per line; entries for a port other
than :data:`~pydra.launcher.hostfile.DEFAULT_AGENT_PORT` are written
``[host]:port``, and host fields may be hashed (``|1|salt|hash``, as
``ssh-keygen -H`` writes them)::

    node01,10.0.0.1 ssh-ed25519 AAAA...
    [node02]:7000 ssh-ed25519 AAAA...

Only ``ssh-ed25519`` lines are used; lines with other key types are ignored.
A line marked ``@revoked`` (as in OpenSSH) names a key that is refused for the
hosts its patterns match (``*`` for all), even if another line trusts it::

    @revoked * ssh-ed25519 AAAA...

Other markers (``@cert-authority``) are refused with the line's number: Pydra
has no host certificates.
The file is refused if someone else could have written it
(:mod:`pydra.strictmodes`).  OpenSSH's pattern lists, shared with
``authorized_keys``'s ``from=``, are here too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydra import strictmodes
from pydra.launcher import keys
from pydra.launcher.hostfile import DEFAULT_AGENT_PORT

__all__ = [
    "HostKeyChanged",
    "HostKeyError",
    "RevokedHostKey",
    "UnknownHostKey",
    "check_host",
    "check_known_hosts",
    "glob_matches",
    "known_hosts_path",
    "matches_pattern_list",
]

_HASHED_HOST_PREFIX = "|1|"
_REVOKED = "@revoked"


class HostKeyError(Exception):
    """A node's host key is not to be trusted."""


class UnknownHostKey(HostKeyError):
    """A node's host key is not in known_hosts, and was not accepted as new."""


class HostKeyChanged(HostKeyError):
    """A node presented a key different from the one known_hosts records for it."""


class RevokedHostKey(HostKeyError):
    """A node presented a key that an ``@revoked`` line of known_hosts refuses."""


def known_hosts_path() -> Path:
    """Return the default path of the ``known_hosts`` file."""
    return keys.pydra_home() / "known_hosts"


# --- OpenSSH pattern lists --------------------------------------------------


def matches_pattern_list(patterns: Iterable[str], matches: Callable[[str], bool]) -> bool:
    """Apply OpenSSH's pattern-list rule: a hit on ``!pattern`` refuses, any other hit accepts."""
    accepted = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if matches(pattern.removeprefix("!")):
            if negated:
                return False
            accepted = True
    return accepted


def glob_matches(pattern: str, text: str) -> bool:
    """Match OpenSSH wildcards: ``*`` is any run of characters, ``?`` any one."""
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.fullmatch(regex, text, re.IGNORECASE | re.DOTALL) is not None


# --- known_hosts ------------------------------------------------------------


@dataclass(frozen=True)
class _KnownHost:
    """One ed25519 line of a ``known_hosts`` file."""

    patterns: tuple[str, ...]  # empty for a hashed entry
    hashed: tuple[bytes, bytes] | None  # (salt, HMAC-SHA1 of the name) of a |1|salt|hash entry
    public_key: bytes
    line_number: int
    revoked: bool = False  # an @revoked line: this key is refused for these hosts

    def matches(self, name: str) -> bool:
        if self.hashed is not None:
            salt, digest = self.hashed
            expected = hmac.new(salt, name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(expected, digest)
        return matches_pattern_list(self.patterns, lambda pattern: glob_matches(pattern, name))


def check_host(
    host: str,
    port: int,
    public_key_bytes: bytes,
    accept_new: bool = False,
    *,
    path: str | os.PathLike[str] | None = None,
) -> None:
    """Check a node's host key against ``known_hosts`` (by default :func:`known_hosts_path`).

    Returns if the key is known for *host* and *port*.  A key that an
    ``@revoked`` line refuses for the host raises :class:`RevokedHostKey`,
    whatever other lines say.  A host with no entry
    raises :class:`UnknownHostKey`, unless *accept_new* is true: then the key
    is appended to the file and trusted from now on.  A host whose entry holds
    a different key always raises :class:`HostKeyChanged`.  A file (or, for
    a new one, a directory) that someone else could have written raises
    :class:`~pydra.strictmodes.StrictModeError`.
    """
    path = Path(path) if path is not None else known_hosts_path()
    offered_key = keys.public_key_bytes(public_key_bytes)
    name = _known_hosts_name(host, port)
    try:
        text = strictmodes.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        text = ""
    entries = [entry for entry in _parse_known_hosts(text, path) if entry.matches(name)]
    for entry in entries:
        if entry.revoked and entry.public_key == offered_key:
            raise RevokedHostKey(
                f"the host key of {name} ({keys.sha256_fingerprint(offered_key)}) is revoked by "
                f"{path}:{entry.line_number}; pydra will not connect to it"
            )
    entries = [entry for entry in entries if not entry.revoked]
    if any(entry.public_key == offered_key for entry in entries):
        return
    if entries:
        raise HostKeyChanged(_changed_key_warning(name, path, entries[0], offered_key))
    if not accept_new:
        raise UnknownHostKey(
            f"the host key of {name} ({keys.sha256_fingerprint(offered_key)}) "
            f"is not in {path}; compare it with 'pydra keygen -l -f "
            f"~/.pydra/{keys.HOST_KEY_NAME}.pub' run on {host}, then accept it (--accept-new)"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not text:
        strictmodes.check_directory(path.parent)  # where the new file goes
    separator = "" if not text or text.endswith("\n") else "\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(f"{separator}{name} {keys.public_key_line(offered_key)}\n")


def check_known_hosts(path: str | os.PathLike[str] | None = None) -> None:
    """Refuse (:class:`~pydra.strictmodes.StrictModeError`) a ``known_hosts`` someone else could write.

    A missing file is fine if the directory it would be created in is safe.
    """
    path = Path(path) if path is not None else known_hosts_path()
    if path.exists():
        strictmodes.check_file(path)
    elif path.parent.exists():
        strictmodes.check_directory(path.parent)


def _known_hosts_name(host: str, port: int) -> str:
    """Write *host* as OpenSSH does: bare for the default port, else ``[host]:port``."""
    host = host.lower()
    return host if port == DEFAULT_AGENT_PORT else f"[{host}]:{port}"


def _parse_known_hosts(text: str, path: Path) -> list[_KnownHost]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = _parse_known_host_line(line, number)
        except ValueError as error:
            raise keys.KeyFileError(f"{path}:{number}: {error}") from None
        if entry is not None:
            entries.append(entry)
    return entries


def _parse_known_host_line(line: str, number: int) -> _KnownHost | None:
    """Parse one line; return None for key types Pydra does not use."""
    marker = line.split(None, 1)[0] if line.startswith("@") else ""
    revoked = marker == _REVOKED
    if marker and not revoked:
        raise ValueError(f"the marker {marker} is not supported (only {_REVOKED} is)")
    line = line[len(marker) :].strip()
    if not line:
        raise ValueError(f"expected hosts and a key after {marker}")
    fields = line.split(None, 1)
    host_field, key_text = fields[0], fields[1] if len(fields) == 2 else ""
    try:
        public_key, _ = keys.parse_public_key_line(key_text)
    except keys.UnsupportedKeyTypeError:
        return None
    raw_key = keys.public_key_bytes(public_key)
    if host_field.startswith(_HASHED_HOST_PREFIX):
        return _KnownHost((), _parse_hashed_host(host_field), raw_key, number, revoked)
    return _KnownHost(tuple(host_field.split(",")), None, raw_key, number, revoked)


def _parse_hashed_host(field: str) -> tuple[bytes, bytes]:
    salt, _, digest = field.removeprefix(_HASHED_HOST_PREFIX).partition("|")
    try:
        return base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    except binascii.Error:
        raise ValueError(f"malformed hashed host name {field!r}") from None


def _changed_key_warning(name: str, path: Path, known: _KnownHost, offered_key: bytes) -> str:
    banner = "@" * 64
    location = f"{path}:{known.line_number}"
    return "\n".join(
        [
            banner,
            f"@{'WARNING: THE HOST KEY OF A PYDRA NODE HAS CHANGED!':^62}@",
            banner,
            f"The agent at {name} presented the key {keys.sha256_fingerprint(offered_key)},",
            f"but {location} says its key is {keys.sha256_fingerprint(known.public_key)}.",
            "Someone may be intercepting this connection (a man-in-the-middle attack),",
            "or the node's host key was regenerated.  Pydra will not connect to it.",
            "If you know that the key was changed on purpose, delete line",
            f"{known.line_number} of {path} and connect again to record the new key.",
        ]
    )
