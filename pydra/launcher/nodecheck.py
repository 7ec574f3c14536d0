"""``pydra node --check``: what is wrong with this host's agent setup, and how to fix it.

It looks at what ``pydra node`` would use, with the same ``--listen``,
``--host-key``, ``--authorized-keys`` and ``--pid-file``, and prints one line
per finding::

    ok: host key /home/you/.pydra/host_ed25519 (SHA256:...)
    problem: /home/you/.pydra/authorized_keys:3: skipped: options must be separated by commas, ...
    note: 127.0.0.1 is a loopback address: no other machine can reach the agent; ...

A *problem* is something the agent refuses, ignores or cannot do; a *note* is
worth knowing but may be meant. ``--check`` exits 1 if there is a problem.

The checks reuse what the agent itself runs: strict modes
(:mod:`pydra.strictmodes`), the key loader, the ``authorized_keys`` parser
(:mod:`pydra.launcher.authorized`) and mpiexec discovery
(:mod:`pydra.launcher.mpiexec`), so that ``--check`` and the agent cannot
disagree. Each check is a function of the paths it looks at; :func:`check_node`
composes them for the single-user agent, and :func:`check_system_node` for
``pydra node --system``: run as root (as the agent is, so that it can read
what the agent reads), its host key, and each local user's
``~/.pydra/authorized_keys`` read as that user under strict modes for that
user, with privsep's own functions (:mod:`pydra.launcher.privsep`), then
how many users may launch::

    ok: /home/ann/.pydra/authorized_keys: 1 key may launch as ann
    problem: refusing /home/bob/.pydra/authorized_keys: writable by its group (mode 0620); chmod go-w ...
    note: /root/.pydra/authorized_keys is ignored: user 'root' has uid 0: a system agent never runs a command as root
    ok: 1 user may launch here: ann
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydra import config, strictmodes
from pydra.launcher import authorized, keys, privsep
from pydra.launcher.mpiexec import MPICH, NO_MPI_LIBRARY, MPIExecError, find_mpiexec, no_mpi_library
from pydra.launcher.remote import Refused

__all__ = [
    "Finding",
    "check_authorized_keys",
    "check_host_key",
    "check_listen",
    "check_mpi",
    "check_node",
    "check_settings",
    "check_system_node",
    "check_users",
    "report",
]

_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


@dataclass(frozen=True)
class Finding:
    """One line of ``--check``'s report."""

    level: str  #: "ok", "note" or "problem"
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"


def _ok(text: str) -> Finding:
    return Finding("ok", text)


def _note(text: str) -> Finding:
    return Finding("note", text)


def _problem(text: str) -> Finding:
    return Finding("problem", text)


def check_node(
    listen: tuple[str, int], host_key: Path | None, authorized_keys: Path | None, pid_file: Path | None = None
) -> list[Finding]:
    """Every finding about the single-user agent ``pydra node`` would run with these options.

    A *host_key* or *authorized_keys* of None is the agent's default, in ``PYDRA_HOME``.
    """
    return [
        *check_settings(),
        *check_host_key(host_key or keys.host_key_path()),
        *check_authorized_keys(authorized_keys or authorized.authorized_keys_path()),
        *check_listen(listen, pid_file),
        *check_mpi(),
    ]


def check_system_node(
    listen: tuple[str, int],
    host_key: Path,
    pid_file: Path | None = None,
    users: list[str] | None = None,
    authorized_keys: Path | None = None,
) -> list[Finding]:
    """Every finding about the system agent ``pydra node --system`` would run with these options.

    It must run as root, as the agent does: only root may read the host key,
    and read each user's ``authorized_keys`` as that user. *users* are the
    users whose files to check (default: every local user with one). An
    *authorized_keys* given is a mistake: the agent refuses to start with it.
    """
    findings = []
    if authorized_keys is not None:
        findings.append(_problem(f"--authorized-keys {authorized_keys} is for single-user mode: a system agent reads "
                                 "each user's own ~/.pydra/authorized_keys; leave it out"))
    if os.geteuid() != 0:
        return [*findings, _problem(
            "pydra node --check --system must run as root, as the agent does: only root may read its host key, "
            "and each user's authorized_keys as that user; run it with sudo"
        )]
    return [
        *findings,
        *check_settings(),
        *check_host_key(host_key),
        *check_users(users),
        *check_listen(listen, pid_file),
        *check_mpi(),
    ]


def report(findings: list[Finding]) -> int:
    """Print *findings* and a summary line; return the exit status (1 if any is a problem)."""
    for finding in findings:
        print(finding)
    problems = sum(finding.level == "problem" for finding in findings)
    if problems:
        print(f"pydra node --check: {problems} problem{'s' * (problems > 1)}")
        return 1
    print("pydra node --check: all is well")
    return 0


def check_settings() -> list[Finding]:
    """``PYDRA_*`` variables the agent would refuse to start with."""
    problem = config.check_settings()
    return [_problem(f"{problem}; fix or unset it")] if problem else []


def check_host_key(path: Path) -> list[Finding]:
    """The host key: present, safe (strict modes), loadable without a passphrase."""
    if not path.exists():
        return [_problem(f'host key {path} does not exist; make one: pydra keygen -f {path} -C "$(hostname)"')]
    try:
        key = keys.load_private_key(path)
    except strictmodes.StrictModeError as error:
        return [_problem(str(error))]
    except keys.PassphraseRequired:
        return [_problem(
            f"host key {path} has a passphrase, which the agent cannot ask for (it starts unattended); "
            f"remove it: ssh-keygen -p -N '' -f {path}"
        )]
    except keys.KeyFileError as error:
        return [_problem(f"host key {error}; make a new one: pydra keygen --force -f {path}")]
    except OSError as error:
        return [_problem(f"cannot read host key {path}: {error.strerror}")]
    return [_ok(f"host key {path} ({keys.sha256_fingerprint(key.public_key())})")]


def check_authorized_keys(path: Path, now: datetime | None = None) -> list[Finding]:
    """``authorized_keys``: safe, every line usable, some key allowed to launch and not expired."""
    add_key = f"add the launching user's ~/.pydra/id_ed25519.pub to {path}"
    if not os.path.lexists(path):
        return [_problem(f"{path} does not exist, so nobody may launch here; {add_key}")]
    findings, launchers, usable = _launch_keys(path, strictmodes.read_bytes, now)
    if launchers == 0:  # (None: the file itself is the problem, already said)
        findings.append(_problem(f"no line of {path} has the launch role, so nobody may launch here; {add_key}"))
    elif usable:
        findings.append(_ok(f"{path}: {_keys(usable)} may launch"))
    return findings


def _launch_keys(
    path: Path, reader: Callable[[Path], bytes], now: datetime | None
) -> tuple[list[Finding], int | None, int]:
    """One ``authorized_keys`` read with *reader*, as the agent reads it.

    Returns the problems (the file refused or unreadable, each skipped line,
    each expired launch key), how many lines have the launch role (None if the
    file cannot be used at all) and how many of those may launch now.
    """
    try:
        entries, skipped = authorized.read_authorized_keys(path, reader)
    except strictmodes.StrictModeError as error:
        return [_problem(str(error))], None, 0
    except OSError as error:
        return [_problem(f"cannot read {path}: {error.strerror}")], None, 0
    findings = [_problem(f"{line}; the agent ignores this line: fix or remove it") for line in skipped]
    now = (now or datetime.now()).astimezone()
    launchers = [entry for entry in entries if "launch" in entry.roles]
    for entry in launchers:
        if entry.expires is not None and entry.expires <= now:
            findings.append(_problem(
                f"{entry.location}: key {entry.fingerprint} expired on {entry.expires:%Y-%m-%d %H:%M}; "
                "remove the line or give it a later expiry-time"
            ))
    usable = sum(entry.expires is None or entry.expires > now for entry in launchers)
    return findings, len(launchers), usable


def _keys(count: int) -> str:
    return f"{count} key{'s' * (count > 1)}"


def check_users(names: list[str] | None = None, now: datetime | None = None) -> list[Finding]:
    """Each user's ``~/.pydra/authorized_keys`` as a system agent reads it, then how many users may launch.

    Needs root. Each file is read as its user, under strict modes for that
    user (:func:`pydra.launcher.privsep.reader_for`), as the agent reads it at
    a launch. Without *names*, every local user with such a file (as
    ``getpwall`` lists them: a directory service may list only some); a
    user the agent refuses whatever the file says (uid 0) gets a note if the
    file is there.
    """
    findings, may_launch = [], []
    for name in names or list(dict.fromkeys(entry.pw_name for entry in pwd.getpwall())):
        try:
            account = privsep.lookup(name)
        except Refused as refusal:
            findings += _refused_user(name, refusal, named=bool(names))
            continue
        path = account.authorized_keys
        with privsep.reading_as(account):  # what the user can see: a home root may not enter is the user's
            exists = os.path.lexists(path)
        if not exists:
            if names:
                findings.append(_note(f"{path} does not exist: no key may launch as {name}"))
            continue
        file_findings, launchers, usable = _launch_keys(path, privsep.reader_for(account), now)
        findings += file_findings
        if launchers == 0:
            findings.append(_note(f"no line of {path} has the launch role: no key may launch as {name}"))
        elif usable:
            findings.append(_ok(f"{path}: {_keys(usable)} may launch as {name}"))
            may_launch.append(name)
    if not may_launch:
        who = f"as {', '.join(names)}" if names else "as any local user"
        findings.append(_problem(f"no key may launch {who}, so nobody may launch here; each user adds the launching "
                                 "user's ~/.pydra/id_ed25519.pub to their own ~/.pydra/authorized_keys"))
    else:
        shown = ", ".join(may_launch[:10]) + ", ..." * (len(may_launch) > 10)
        findings.append(_ok(f"{len(may_launch)} user{'s' * (len(may_launch) > 1)} may launch here: {shown}"))
    return findings


def _refused_user(name: str, refusal: Refused, named: bool) -> list[Finding]:
    """A user the system agent never runs anything as: a note if it has a file (or was named)."""
    try:
        path = Path(pwd.getpwnam(name).pw_dir or "/") / privsep.USER_KEYS
    except KeyError:  # no such user: named by mistake, or removed since getpwall
        return [_problem(str(refusal))] if named else []
    return [_note(f"{path} is ignored: {refusal}")] if named or os.path.lexists(path) else []


def check_listen(listen: tuple[str, int], pid_file: Path | None = None) -> list[Finding]:
    """The address to listen on: resolvable, an address of this host, free or held by a running agent."""
    host, port = listen
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return [_problem(f"cannot resolve {host}: {error.strerror}; give --listen an address of this host")]
    findings = []
    for family, kind, protocol, _, address in dict.fromkeys(addresses):
        where = _show(address)
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent's listener does
            try:
                probe.bind(address)
            except OSError as error:
                findings.append(_bind_refused(where, address[0], port, error, pid_file))
                continue
        findings.append(_ok(f"{where} is free to listen on"))
    if all(ipaddress.ip_address(address[4][0]).is_loopback for address in addresses):
        findings.append(_note(
            f"{host} is a loopback address: no other machine can reach the agent; "
            "to launch from elsewhere, --listen ADDR with this host's address on the network"
        ))
    return findings


def _bind_refused(where: str, host: str, port: int, error: OSError, pid_file: Path | None) -> Finding:
    """What a refused bind means: the running agent holds the port (fine), or a problem and its fix."""
    if error.errno == errno.EADDRINUSE:
        holders = _listeners(host, port)  # only processes we may look at: ours (all of them for root)
        agents = [pid for pid in holders if _is_agent(pid)]
        if agents:
            by_file = f", as {pid_file} says" if _pid_in(pid_file) in agents else ""
            return _ok(f"{where} is held by the running agent (pid {agents[0]}{by_file})")
        who = f"pid {holders[0]} ({_command(holders[0])})" if holders else "a process that is not yours"
        return _problem(f"{where} is in use by {who}; stop it, or choose another port: --listen ADDR:PORT "
                        "(and port=PORT in the hostfiles)")
    if error.errno == errno.EADDRNOTAVAIL:
        return _problem(f"{where} is not an address of this host; give --listen one of its addresses (hostname -I)")
    if error.errno == errno.EACCES:
        return _problem(f"{where}: port {port} needs privileges; use a port from 1024 up, such as the default 7470")
    return _problem(f"cannot listen on {where}: {error.strerror}")


def check_mpi() -> list[Finding]:
    """mpi4py and a matching mpiexec in this environment: what the launched commands run with."""
    try:
        mpiexec = find_mpiexec()
    except ImportError as error:
        return [_problem(f"{sys.executable} cannot import mpi4py ({error}); install Pydra with an MPI: "
                         "pip install -e '.[mpich]'")]
    except (MPIExecError, RuntimeError, OSError) as error:
        return [_problem(NO_MPI_LIBRARY if no_mpi_library(error) else str(error))]
    if mpiexec.implementation == MPICH and not (Path(mpiexec.path).parent / "hydra_pmi_proxy").exists():
        return [_problem(f"no hydra_pmi_proxy beside {mpiexec.path}: MPICH's launches cannot start here")]
    return [_ok(f"{mpiexec.path} launches {mpiexec.implementation} jobs with {sys.executable}")]


# -- who holds a port ----------------------------------------------------------------------------


def _listeners(host: str, port: int) -> list[int]:
    """Pids of the processes (that we may look at) listening where a bind to *host*:*port* collides.

    That is on *port* at *host* itself, or at a wildcard address (or anywhere, if *host* is one):
    agents on one port at two addresses are told apart.
    """
    ours = ipaddress.ip_address(host.partition("%")[0])  # (an IPv6 address may name its interface)
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port or fields[3] != _TCP_LISTEN:
                continue
            theirs = _proc_address(address)
            if ours.is_unspecified or theirs.is_unspecified or theirs == ours:
                inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:  # not ours to look at, or gone
            continue
    return sorted(pids)


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: hex of 32-bit words in the host's (little-endian) order."""
    raw = bytes.fromhex(text)
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    return getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is 127.0.0.1


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "gone"


def _is_agent(pid: int) -> bool:
    """Whether *pid* runs ``pydra node`` (``pydra-node``, ``python -m pydra node``)."""
    words = _command(pid).split()
    return any(word.endswith("pydra-node") or (word.endswith("pydra") and words[i + 1 : i + 2] == ["node"])
               for i, word in enumerate(words))


def _pid_in(pid_file: Path | None) -> int | None:
    try:
        return int(pid_file.read_text().strip()) if pid_file else None
    except (OSError, ValueError):
        return None


def _show(address: tuple) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
