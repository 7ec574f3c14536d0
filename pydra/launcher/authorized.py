"""Who may use a node, and which nodes to trust: ``authorized_keys`` and ``known_hosts``.

Both files live in :func:`~pydra.launcher.keys.pydra_home` and use OpenSSH's
syntax, so habits and tools carry over (``ssh-keygen -lf`` lists them,
``ssh-keygen -H`` hashes known_hosts).  Only ``ssh-ed25519`` keys are used.

``authorized_keys`` is read by a node's agent on every connection, so edits
take effect at once.  One user key per line, optionally preceded by options::

    # comment
    ssh-ed25519 AAAA... alice@laptop
    from="10.0.0.0/8,!10.0.0.5",pydra-role="launch|admin" ssh-ed25519 AAAA... bob
    expiry-time="20261231" ssh-ed25519 AAAA... visitor

    from="PATTERNS"       client IP addresses or host names the key may come
                          from: comma-separated, with * and ? wildcards, CIDR
                          networks such as 10.0.0.0/8, and !PATTERN to exclude
    expiry-time="TIME"    YYYYMMDD[HHMM[SS]] in local time; refused from then on
    pydra-role="ROLES"    what the key may do: launch, admin, or both separated
                          by | or , (default: launch only)

Any other option is an error rather than being ignored: an OpenSSH option
such as ``command=`` restricts a key, and silently dropping it would grant
more than the file's author meant to.

``known_hosts`` is read by the launcher.  One node host key per line; entries
for a port other than :data:`~pydra.launcher.hostfile.DEFAULT_AGENT_PORT` are
written ``[host]:port``, and host fields may be hashed (``|1|salt|hash``)::

    node01,10.0.0.1 ssh-ed25519 AAAA...
    [node02]:7000 ssh-ed25519 AAAA...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydra.launcher import keys
from pydra.launcher.hostfile import DEFAULT_AGENT_PORT

__all__ = [
    "DEFAULT_ROLES",
    "ROLES",
    "AuthorizationError",
    "AuthorizedKey",
    "HostKeyChanged",
    "UnknownHostKey",
    "authorize",
    "authorized_keys_path",
    "check_host",
    "known_hosts_path",
    "read_authorized_keys",
]

ROLES = frozenset({"launch", "admin"})  #: every pydra-role a key can be given
DEFAULT_ROLES = frozenset({"launch"})  #: the roles of a key without pydra-role

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_EXPIRY_FORMATS = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
_OPTION_NAME = re.compile(r"[A-Za-z0-9-]+")
_HASHED_HOST_PREFIX = "|1|"


class AuthorizationError(Exception):
    """A client's key is not allowed to do what it asked."""


class UnknownHostKey(Exception):
    """A node's host key is not in known_hosts, and was not accepted as new."""


class HostKeyChanged(Exception):
    """A node presented a key different from the one known_hosts records for it."""


def authorized_keys_path() -> Path:
    """Return the default path of the ``authorized_keys`` file."""
    return keys.pydra_home() / "authorized_keys"


def known_hosts_path() -> Path:
    """Return the default path of the ``known_hosts`` file."""
    return keys.pydra_home() / "known_hosts"


# --- OpenSSH pattern lists --------------------------------------------------


def _matches_pattern_list(patterns: Iterable[str], matches: Callable[[str], bool]) -> bool:
    """Apply OpenSSH's pattern-list rule: a hit on ``!pattern`` refuses, any other hit accepts."""
    accepted = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if matches(pattern.removeprefix("!")):
            if negated:
                return False
            accepted = True
    return accepted


def _glob_matches(pattern: str, text: str) -> bool:
    """Match OpenSSH wildcards: ``*`` is any run of characters, ``?`` any one."""
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.fullmatch(regex, text, re.IGNORECASE | re.DOTALL) is not None


def _network(pattern: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Return the network a from= pattern names, or None for a host name or wildcard."""
    try:
        return ipaddress.ip_network(pattern)  # a bare address becomes a /32 or /128
    except ValueError:
        if "/" in pattern:
            raise ValueError(
                f"{pattern!r} is not a network: expected an address/prefix "
                "with no host bits set, such as 10.0.0.0/8"
            ) from None
        return None


def _client_matches(pattern: str, address: _IPAddress, host: str | None) -> bool:
    network = _network(pattern)
    if network is not None:
        return address in network
    return _glob_matches(pattern, str(address)) or (
        host is not None and _glob_matches(pattern, host)
    )


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

    def refusal(
        self, address: _IPAddress, host: str | None, role: str, now: datetime
    ) -> str | None:
        """Return why this line refuses the request, or None if it allows it."""
        if self.expires is not None and now >= self.expires:
            expiry = _describe_time(self.expires)
            return f"key {self.fingerprint} expired on {expiry} (see {self.location})"
        if self.allowed_from is not None and not _matches_pattern_list(
            self.allowed_from, lambda pattern: _client_matches(pattern, address, host)
        ):
            client = f"{address} ({host})" if host else str(address)
            return f"key {self.fingerprint} is not allowed from {client} (see {self.location})"
        if role not in self.roles:
            return f"key {self.fingerprint} lacks role {role} (see {self.location})"
        return None


def read_authorized_keys(
    path: str | os.PathLike[str] | None = None,
) -> tuple[list[AuthorizedKey], list[str]]:
    """Read an ``authorized_keys`` file (by default :func:`authorized_keys_path`).

    Returns the ed25519 keys and a list of warnings about lines that were
    skipped because they hold other key types.  A malformed line raises
    :class:`~pydra.launcher.keys.KeyFileError` naming ``path:line``.
    """
    path = Path(path) if path is not None else authorized_keys_path()
    entries: list[AuthorizedKey] = []
    warnings: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        location = f"{path}:{number}"
        try:
            entries.append(_parse_authorized_line(line, location))
        except keys.UnsupportedKeyTypeError as error:
            warnings.append(f"{location}: skipped: {error}")
        except ValueError as error:
            raise keys.KeyFileError(f"{location}: {error}") from None
    return entries, warnings


def authorize(
    public_key_bytes: bytes,
    client_address: str,
    role: str,
    now: datetime | None = None,
    *,
    client_host: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> AuthorizedKey:
    """Check that a client's key may act in *role*; return the line that allows it.

    *client_address* is the client's IP address and *client_host*, if known,
    its host name, both matched against from= patterns.  *now* (default: the
    current time) is compared with expiry-time.  As in OpenSSH, a key listed
    on several lines is allowed if any of its lines allows the request.
    Raises :class:`AuthorizationError` with the reason otherwise, and
    :class:`~pydra.launcher.keys.KeyFileError` if the file is malformed.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}, expected one of {sorted(ROLES)}")
    path = Path(path) if path is not None else authorized_keys_path()
    address = ipaddress.ip_address(client_address)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # an IPv4 client seen through an IPv6 socket
    if now is None:
        now = datetime.now()
    now = now.astimezone()  # a naive `now` is taken as local time, like expiry-time
    offered_key = keys.public_key_bytes(public_key_bytes)
    key_fingerprint = keys.sha256_fingerprint(offered_key)
    try:
        entries, _ = read_authorized_keys(path)
    except FileNotFoundError:
        raise AuthorizationError(
            f"key {key_fingerprint} is not in {path} (the file does not exist)"
        ) from None
    refusals = []
    for entry in entries:
        if entry.public_key == offered_key:
            refusal = entry.refusal(address, client_host, role, now)
            if refusal is None:
                return entry
            refusals.append(refusal)
    raise AuthorizationError(refusals[0] if refusals else f"key {key_fingerprint} is not in {path}")


def _parse_authorized_line(line: str, location: str) -> AuthorizedKey:
    fields = line.split()
    options: dict[str, str | None] = {}
    key_text = line
    # A line starts with options unless its second field is the base64 key.
    if len(fields) < 2 or not fields[1].startswith("AAAA"):
        options, key_text = _parse_options(line)
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


# --- known_hosts ------------------------------------------------------------


@dataclass(frozen=True)
class _KnownHost:
    """One ed25519 line of a ``known_hosts`` file."""

    patterns: tuple[str, ...]  # empty for a hashed entry
    hashed: tuple[bytes, bytes] | None  # (salt, HMAC-SHA1 of the name) of a |1|salt|hash entry
    public_key: bytes
    line_number: int

    def matches(self, name: str) -> bool:
        if self.hashed is not None:
            salt, digest = self.hashed
            expected = hmac.new(salt, name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(expected, digest)
        return _matches_pattern_list(self.patterns, lambda pattern: _glob_matches(pattern, name))


def check_host(
    host: str,
    port: int,
    public_key_bytes: bytes,
    accept_new: bool = False,
    *,
    path: str | os.PathLike[str] | None = None,
) -> None:
    """Check a node's host key against ``known_hosts`` (by default :func:`known_hosts_path`).

    Returns if the key is known for *host* and *port*.  A host with no entry
    raises :class:`UnknownHostKey`, unless *accept_new* is true: then the key
    is appended to the file and trusted from now on.  A host whose entry holds
    a different key always raises :class:`HostKeyChanged`.
    """
    path = Path(path) if path is not None else known_hosts_path()
    offered_key = keys.public_key_bytes(public_key_bytes)
    name = _known_hosts_name(host, port)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    entries = [entry for entry in _parse_known_hosts(text, path) if entry.matches(name)]
    if any(entry.public_key == offered_key for entry in entries):
        return
    if entries:
        raise HostKeyChanged(_changed_key_warning(name, path, entries[0], offered_key))
    if not accept_new:
        raise UnknownHostKey(
            f"the host key of {name} ({keys.sha256_fingerprint(offered_key)}) "
            f"is not in {path}; compare it with 'pydra keygen -l -f "
            f"~/.pydra/{keys.HOST_KEY_NAME}.pub' run on {host}, then accept it"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    separator = "" if not text or text.endswith("\n") else "\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(f"{separator}{name} {keys.public_key_line(offered_key)}\n")


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
    if line.startswith("@"):
        # Skipping @revoked silently would trust a revoked key, so refuse instead.
        raise ValueError("markers such as @revoked and @cert-authority are not supported")
    fields = line.split(None, 1)
    host_field, key_text = fields[0], fields[1] if len(fields) == 2 else ""
    try:
        public_key, _ = keys.parse_public_key_line(key_text)
    except keys.UnsupportedKeyTypeError:
        return None
    raw_key = keys.public_key_bytes(public_key)
    if host_field.startswith(_HASHED_HOST_PREFIX):
        return _KnownHost((), _parse_hashed_host(host_field), raw_key, number)
    return _KnownHost(tuple(host_field.split(",")), None, raw_key, number)


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
