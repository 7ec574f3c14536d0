"""Who may use a node, and which nodes to trust: ``authorized_keys`` and ``known_hosts``.

Both files live in :func:`~pydra.launcher.keys.pydra_home` and use OpenSSH's
syntax, so habits and tools carry over (``ssh-keygen -lf`` lists them,
``ssh-keygen -H`` hashes known_hosts).  Only ``ssh-ed25519`` keys are used.

``authorized_keys`` is read by a node's agent (and a service cluster's admin
endpoint) on every connection, so edits take effect at once.  One user key
per line, optionally preceded by options separated by commas, with no spaces
between them, as in OpenSSH::

    # comment
    ssh-ed25519 AAAA... alice@laptop
    from="10.0.0.0/8,!10.0.0.5",pydra-role="launch|admin" ssh-ed25519 AAAA... bob
    expiry-time="20261231" ssh-ed25519 AAAA... visitor

    from="PATTERNS"       client IP addresses the key may come from:
                          comma-separated, with * and ? wildcards, CIDR
                          networks such as 10.0.0.0/8, and !PATTERN to exclude.
                          Host names are not supported: a line with one is
                          skipped (below), as DNS is not what Pydra trusts
    expiry-time="TIME"    YYYYMMDD[HHMM[SS]] in local time; refused from then on
    pydra-role="ROLES"    what the key may do: launch, admin, or both separated
                          by | or , (default: launch only)

A line with any other option is skipped rather than used without it: an
OpenSSH option such as ``command=`` restricts a key, and dropping it would
grant more than the file's author meant to.  Every skipped line (other key
types, unknown options, options separated by spaces, a malformed key) grants
nothing, leaves the other lines alone, and is reported as ``path:line: skipped:
reason``; :class:`AuthorizedKeysFile` logs these at the first read and
whenever the file changes.

Before reading either file, Pydra checks that nobody else could have written
it (:mod:`pydra.strictmodes`, like OpenSSH's ``StrictModes``).

``known_hosts``, read by the launcher, is handled by
:mod:`pydra.launcher.known_hosts`; its names are re-exported here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydra import strictmodes
from pydra.launcher import keys
from pydra.launcher.known_hosts import (
    HostKeyChanged,
    HostKeyError,
    RevokedHostKey,
    UnknownHostKey,
    check_host,
    check_known_hosts,
    glob_matches,
    known_hosts_path,
    matches_pattern_list,
)

__all__ = [
    "DEFAULT_ROLES",
    "ROLES",
    "AuthorizationError",
    "AuthorizedKey",
    "AuthorizedKeysFile",
    "HostKeyChanged",
    "HostKeyError",
    "RevokedHostKey",
    "SkippedLine",
    "UnknownHostKey",
    "authorize",
    "authorized_keys_path",
    "check_host",
    "check_known_hosts",
    "known_hosts_path",
    "read_authorized_keys",
]

ROLES = frozenset({"launch", "admin"})  #: every pydra-role a key can be given
DEFAULT_ROLES = frozenset({"launch"})  #: the roles of a key without pydra-role

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_EXPIRY_FORMATS = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
_OPTION_NAME = re.compile(r"[A-Za-z0-9-]+")
# Address wildcards, as OpenSSH matches them against the client's address text.
_ADDRESS_WILDCARD = re.compile(r"[0-9.*?]+|[0-9A-Fa-f:.*?]*:[0-9A-Fa-f:.*?]*")
_ED25519_FIELD = re.compile(rf"(?<!\S){keys.KEY_TYPE}\s+AAAA\S+")


class AuthorizationError(Exception):
    """A client's key is not allowed to do what it asked."""


def authorized_keys_path() -> Path:
    """Return the default path of the ``authorized_keys`` file."""
    return keys.pydra_home() / "authorized_keys"


# --- from= patterns ---------------------------------------------------------


def _network(pattern: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Return the network a from= pattern names, or None for an address wildcard.

    Raises ValueError for a malformed network and for a host name: OpenSSH
    matches those only with ``UseDNS yes`` (off by default), after a reverse
    lookup confirmed forward, which trusts whoever controls the client's
    reverse DNS zone; Pydra refuses the line at load instead.
    """
    try:
        return ipaddress.ip_network(pattern)  # a bare address becomes a /32 or /128
    except ValueError:
        if "/" in pattern:
            raise ValueError(
                f"{pattern!r} is not a network: expected an address/prefix "
                "with no host bits set, such as 10.0.0.0/8"
            ) from None
    if not _ADDRESS_WILDCARD.fullmatch(pattern):
        raise ValueError(
            f"from= host name {pattern!r} is not supported (pydra matches client addresses only, "
            "as OpenSSH does without UseDNS): use an address or network such as 10.1.0.0/16"
        )
    return None


def _client_matches(pattern: str, address: _IPAddress) -> bool:
    network = _network(pattern)
    if network is not None:
        return address in network
    return glob_matches(pattern, str(address))


# --- authorized_keys --------------------------------------------------------


@dataclass(frozen=True)
class AuthorizedKey:
    """One usable line of an ``authorized_keys`` file."""

    public_key: bytes  #: the raw 32-byte Ed25519 public key
    comment: str  #: the text after the key, often user@host
    roles: frozenset[str]  #: a subset of ROLES
    allowed_from: tuple[str, ...] | None  #: from= patterns; None means from anywhere
    expires: datetime | None  #: timezone-aware; None means never
    location: str  #: ``path:line``, for messages

    @property
    def fingerprint(self) -> str:
        """The key's ``SHA256:...`` fingerprint."""
        return keys.sha256_fingerprint(self.public_key)

    def refusal(self, address: _IPAddress, role: str, now: datetime) -> str | None:
        """Return why this line refuses the request, or None if it allows it."""
        if self.expires is not None and now >= self.expires:
            expiry = _describe_time(self.expires)
            return f"key {self.fingerprint} expired on {expiry} (see {self.location})"
        if self.allowed_from is not None and not matches_pattern_list(
            self.allowed_from, lambda pattern: _client_matches(pattern, address)
        ):
            return f"key {self.fingerprint} is not allowed from {address} (see {self.location})"
        if role not in self.roles:
            return f"key {self.fingerprint} lacks role {role} (see {self.location})"
        return None


@dataclass(frozen=True)
class SkippedLine:
    """A line of ``authorized_keys`` that grants nothing, and why."""

    location: str  #: ``path:line``
    reason: str  #: one line
    public_key: bytes | None  #: the ed25519 key the line names, if one could be read

    def __str__(self) -> str:
        return f"{self.location}: skipped: {self.reason}"


def read_authorized_keys(
    path: str | os.PathLike[str] | None = None,
    reader: Callable[[Path], bytes] = strictmodes.read_bytes,
) -> tuple[list[AuthorizedKey], list[str]]:
    """Read an ``authorized_keys`` file (by default :func:`authorized_keys_path`).

    Returns the usable ed25519 keys, and a warning ``path:line: skipped:
    reason`` for every other line that is neither blank nor a comment (other
    key types, malformed options or keys). A bad line grants nothing and
    affects no other line. *reader* reads the file under strict modes (a
    system agent's reads it as its user, :func:`pydra.launcher.privsep.reader_for`).
    Raises :class:`~pydra.strictmodes.StrictModeError` if someone else could
    have written the file, and ``OSError`` if it cannot be read.
    """
    path = Path(path) if path is not None else authorized_keys_path()
    entries, skipped = _parse_authorized_keys(reader(path), path)
    return entries, [str(line) for line in skipped]


def authorize(
    public_key_bytes: bytes,
    client_address: str,
    role: str,
    now: datetime | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
) -> AuthorizedKey:
    """Check that a client's key may act in *role*; return the line that allows it.

    *client_address* is the client's IP address, matched against from= patterns.  *now* (default: the
    current time) is compared with expiry-time.  As in OpenSSH, a key listed
    on several lines is allowed if any of its lines allows the request.
    Raises :class:`AuthorizationError` with the reason otherwise (a missing
    file refuses every key), and :class:`~pydra.strictmodes.StrictModeError`
    if the file is not safe to trust.
    """
    path = Path(path) if path is not None else authorized_keys_path()
    try:
        entries, skipped = _read_authorized_keys(path)
    except FileNotFoundError:
        offered = keys.sha256_fingerprint(keys.public_key_bytes(public_key_bytes))
        raise AuthorizationError(f"key {offered} is not in {path} (the file does not exist)") from None
    return _authorize(entries, skipped, path, public_key_bytes, client_address, role, now)


class AuthorizedKeysFile:
    """``authorized_keys`` as a server uses it: read at every check, so that edits apply at once.

    The agent and the admin endpoint hold one. The first read, and every read
    that finds the file changed (a *reload*), logs how many keys it holds and
    each skipped line with ``path:line`` and the reason; a file that is
    missing or that strict modes refuse is logged too. Every refusal is an
    :class:`AuthorizationError` whose message says why.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        log: logging.Logger,
        reader: Callable[[Path], bytes] = strictmodes.read_bytes,
    ) -> None:
        self.path = Path(path) if path is not None else authorized_keys_path()
        self.log = log
        self.reader = reader  #: reads the file under strict modes (a system agent's reads it as its user)
        self._last: object = None  # what the last read found, to log only what changed

    def load(self) -> tuple[list[AuthorizedKey], list[SkippedLine]]:
        """Read the file, logging what changed since the last read.

        Raises :class:`~pydra.strictmodes.StrictModeError` or ``OSError``
        (``FileNotFoundError`` for a missing file), after logging it.
        """
        try:
            data = self.reader(self.path)
        except (strictmodes.StrictModeError, OSError) as error:
            described = _describe(error)
            self._note(str(error), lambda: self.log.warning("%s: every client is refused", described))
            raise
        entries, skipped = _parse_authorized_keys(data, self.path)

        def report() -> None:
            self.log.info("read %s: %d usable keys, %d lines skipped", self.path, len(entries), len(skipped))
            for line in skipped:
                self.log.warning("%s", line)

        self._note(hashlib.sha256(data).digest(), report)
        return entries, skipped

    def authorize(
        self, public_key_bytes: bytes, client_address: str, role: str, now: datetime | None = None
    ) -> AuthorizedKey:
        """Like :func:`authorize`, with this file; every refusal is an :class:`AuthorizationError`."""
        try:
            entries, skipped = self.load()
        except (strictmodes.StrictModeError, OSError) as error:
            raise AuthorizationError(_describe(error)) from None
        return _authorize(entries, skipped, self.path, public_key_bytes, client_address, role, now)

    def _note(self, state: object, report: Callable[[], None]) -> None:
        if state != self._last:
            self._last = state
            report()


def _describe(error: Exception) -> str:
    """One line for a file that cannot be used."""
    if isinstance(error, FileNotFoundError):
        return f"{error.filename} does not exist"
    if isinstance(error, OSError) and error.strerror:
        return f"cannot read {error.filename}: {error.strerror.lower()}"
    return str(error)


def _read_authorized_keys(path: Path) -> tuple[list[AuthorizedKey], list[SkippedLine]]:
    return _parse_authorized_keys(strictmodes.read_bytes(path), path)


def _parse_authorized_keys(data: bytes, path: Path) -> tuple[list[AuthorizedKey], list[SkippedLine]]:
    entries: list[AuthorizedKey] = []
    skipped: list[SkippedLine] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        location = f"{path}:{number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped.append(SkippedLine(location, "not valid UTF-8", None))
            continue
        if not line or line.startswith("#"):
            continue
        try:
            entries.append(_parse_authorized_line(line, location))
        except ValueError as error:  # UnsupportedKeyTypeError too: other key types are skipped
            skipped.append(SkippedLine(location, str(error), _key_named_in(line)))
    return entries, skipped


def _key_named_in(line: str) -> bytes | None:
    """The ed25519 key a skipped line names, if any: so a refusal can point at the line."""
    match = _ED25519_FIELD.search(line)
    if match is None:
        return None
    try:
        return keys.public_key_bytes(keys.parse_public_key_line(match.group())[0])
    except ValueError:
        return None


def _authorize(
    entries: list[AuthorizedKey],
    skipped: list[SkippedLine],
    path: Path,
    public_key_bytes: bytes,
    client_address: str,
    role: str,
    now: datetime | None,
) -> AuthorizedKey:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}, expected one of {sorted(ROLES)}")
    address = ipaddress.ip_address(client_address)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # an IPv4 client seen through an IPv6 socket
    if now is None:
        now = datetime.now()
    now = now.astimezone()  # a naive `now` is taken as local time, like expiry-time
    offered_key = keys.public_key_bytes(public_key_bytes)
    key_fingerprint = keys.sha256_fingerprint(offered_key)
    refusals = []
    for entry in entries:
        if entry.public_key == offered_key:
            refusal = entry.refusal(address, role, now)
            if refusal is None:
                return entry
            refusals.append(refusal)
    if refusals:
        raise AuthorizationError(refusals[0])
    for line in skipped:
        if line.public_key == offered_key:
            raise AuthorizationError(f"key {key_fingerprint} is only on {line.location}, which is skipped: {line.reason}")
    raise AuthorizationError(f"key {key_fingerprint} is not in {path}")


def _parse_authorized_line(line: str, location: str) -> AuthorizedKey:
    fields = line.split()
    options: dict[str, str | None] = {}
    key_text = line
    # A line starts with options unless its second field is the base64 key.
    if len(fields) < 2 or not fields[1].startswith("AAAA"):
        options, key_text = _parse_options(line)
        rest = key_text.split()
        if "=" in rest[0] or (len(rest) > 1 and not rest[1].startswith("AAAA")):
            # `a="x" b="y" ssh-ed25519 ...`: taking only the first option would drop the others.
            raise ValueError(
                "options must be separated by commas, not spaces (OpenSSH syntax): "
                'pydra-role="launch",from="10.0.0.0/8" ssh-ed25519 AAAA...'
            )
    public_key, comment = keys.parse_public_key_line(key_text)
    roles = DEFAULT_ROLES
    allowed_from: tuple[str, ...] | None = None
    expires: datetime | None = None
    for name, value in options.items():
        if name not in ("from", "expiry-time", "pydra-role"):
            raise ValueError(
                f"unsupported option {name!r} (pydra understands from, expiry-time and pydra-role)"
            )
        if value is None:
            raise ValueError(f'option {name} needs a value: {name}="..."')
        if name == "from":
            allowed_from = _parse_from(value)
        elif name == "expiry-time":
            expires = _parse_expiry(value)
        else:
            roles = _parse_roles(value)
    return AuthorizedKey(
        keys.public_key_bytes(public_key), comment, roles, allowed_from, expires, location
    )


def _parse_options(line: str) -> tuple[dict[str, str | None], str]:
    """Split ``a,b="x, y" ssh-ed25519 AAAA...`` into its options and the rest of the line."""
    options: dict[str, str | None] = {}
    position = 0
    while True:
        match = _OPTION_NAME.match(line, position)
        if match is None:
            raise ValueError(f"expected an option name or a key type at column {position + 1}")
        name = match.group().lower()  # option names are case-insensitive, as in OpenSSH
        position = match.end()
        value = None
        if line.startswith('="', position):
            value, position = _read_quoted(line, position + 1)
        elif line.startswith("=", position):
            raise ValueError(f'the value of option {name} must be in double quotes: {name}="..."')
        if name in options:
            raise ValueError(f"option {name} is given twice")
        options[name] = value
        if position == len(line):
            raise ValueError("expected a key after the options")
        if line[position].isspace():
            return options, line[position:]
        if line[position] != ",":
            raise ValueError(f"expected ',' or a space after option {name}")
        position += 1


def _read_quoted(line: str, position: int) -> tuple[str, int]:
    """Read the string quoted at line[position]; return it and the position after it."""
    value = []
    position += 1  # the opening quote
    while position < len(line):
        if line.startswith('\\"', position):  # an escaped quote, as OpenSSH allows
            value.append('"')
            position += 2
        elif line[position] == '"':
            return "".join(value), position + 1
        else:
            value.append(line[position])
            position += 1
    raise ValueError("a quoted option value is missing its closing quote")


def _parse_from(value: str) -> tuple[str, ...]:
    patterns = tuple(pattern.strip() for pattern in value.split(","))
    for pattern in patterns:
        if not pattern.removeprefix("!"):
            raise ValueError(f'from="{value}" contains an empty pattern')
        _network(pattern.removeprefix("!"))  # rejects malformed networks now, not per client
    return patterns


def _parse_expiry(value: str) -> datetime:
    time_format = _EXPIRY_FORMATS.get(len(value))
    if time_format is None or not value.isdigit():
        raise ValueError(
            f"expiry-time must be YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS, got {value!r}"
        )
    try:
        return datetime.strptime(value, time_format).astimezone()  # local time
    except ValueError:
        raise ValueError(f"expiry-time {value!r} is not a valid date and time") from None


def _parse_roles(value: str) -> frozenset[str]:
    roles = frozenset(role.strip() for role in re.split(r"[|,]", value))
    unknown = roles - ROLES
    if unknown:
        raise ValueError(f"unknown pydra-role {sorted(unknown)[0]!r}, expected launch and/or admin")
    return roles


def _describe_time(moment: datetime) -> str:
    if (moment.hour, moment.minute, moment.second) == (0, 0, 0):
        return f"{moment:%Y-%m-%d}"
    return f"{moment:%Y-%m-%d %H:%M:%S}"
