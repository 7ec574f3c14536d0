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
composes them for the single-user agent, and an agent run by root for every
user would compose the same ones over its own host key and each user's
``authorized_keys``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydra import config, strictmodes
from pydra.launcher import authorized, keys
from pydra.launcher.mpiexec import MPICH, MPIExecError, find_mpiexec

__all__ = [
    "Finding",
    "check_authorized_keys",
    "check_host_key",
    "check_listen",
    "check_mpi",
    "check_node",
    "check_settings",
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
    try:
        entries, skipped = authorized.read_authorized_keys(path)
    except FileNotFoundError:
        return [_problem(f"{path} does not exist, so nobody may launch here; {add_key}")]
    except strictmodes.StrictModeError as error:
        return [_problem(str(error))]
    except OSError as error:
        return [_problem(f"cannot read {path}: {error.strerror}")]
    findings = [_problem(f"{line}; the agent ignores this line: fix or remove it") for line in skipped]
    now = (now or datetime.now()).astimezone()
    launchers = [entry for entry in entries if "launch" in entry.roles]
    for entry in launchers:
        if entry.expires is not None and entry.expires <= now:
            findings.append(_problem(
                f"{entry.location}: key {entry.fingerprint} expired on {entry.expires:%Y-%m-%d %H:%M}; "
                "remove the line or give it a later expiry-time"
            ))
    usable = [entry for entry in launchers if entry.expires is None or entry.expires > now]
    if not launchers:
        findings.append(_problem(f"no line of {path} has the launch role, so nobody may launch here; {add_key}"))
    elif usable:
        findings.append(_ok(f"{path}: {len(usable)} key{'s' * (len(usable) > 1)} may launch"))
    return findings


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
                findings.append(_bind_refused(where, port, error, pid_file))
                continue
        findings.append(_ok(f"{where} is free to listen on"))
    if all(ipaddress.ip_address(address[4][0]).is_loopback for address in addresses):
        findings.append(_note(
            f"{host} is a loopback address: no other machine can reach the agent; "
            "to launch from elsewhere, --listen ADDR with this host's address on the network"
        ))
    return findings


def _bind_refused(where: str, port: int, error: OSError, pid_file: Path | None) -> Finding:
    """What a refused bind means: the running agent holds the port (fine), or a problem and its fix."""
    if error.errno == errno.EADDRINUSE:
        holders = _listeners(port)  # only processes we may look at: ours (all of them for root)
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
    except (MPIExecError, RuntimeError, OSError) as error:  # RuntimeError: no MPI library mpi4py can load
        return [_problem(str(error))]
    if mpiexec.implementation == MPICH and not (Path(mpiexec.path).parent / "hydra_pmi_proxy").exists():
        return [_problem(f"no hydra_pmi_proxy beside {mpiexec.path}: MPICH's launches cannot start here")]
    return [_ok(f"{mpiexec.path} launches {mpiexec.implementation} jobs with {sys.executable}")]


# -- who holds a port ----------------------------------------------------------------------------


def _listeners(port: int) -> list[int]:
    """Pids of the processes (that we may look at) with a TCP socket listening on *port*."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == _TCP_LISTEN:
                inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:  # not ours to look at, or gone
            continue
    return sorted(pids)


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
