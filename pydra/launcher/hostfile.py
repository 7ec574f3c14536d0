"""Hostfiles: the nodes a job runs on, and how many processes (slots) each takes.

Both mpirun dialects are accepted, so existing hostfiles keep working, plus
Pydra's ``port=`` for an agent listening on a non-default port::

    # comments start with '#', also after an entry
    node01                      # 1 slot, agent on DEFAULT_AGENT_PORT
    node02:4                    # MPICH style: 4 slots
    node03 slots=4              # Open MPI style
    node04 slots=4 max_slots=8  # may be oversubscribed up to 8 processes
    node05:2 port=7000          # the agent on node05 listens on port 7000
    bob@node06:2                # on a system agent (pydra node --system), run as bob

A host without a slot count gets one slot.  A host listed more than once
(same name and port) is merged, as mpirun does: its slots are added up, and
so are its max_slots, which stay unlimited if any of its lines leaves them
unlimited.  The same name with different ports is two hosts: several agents
can run on one machine.  IPv6 addresses are not supported in hostfiles.

``user@host`` names the local user a system agent (``pydra node --system``)
runs the job's processes as, like ssh's ``user@host``; without it, the user is
the launcher's login name. A single-user agent runs everything as itself and
ignores the name. The same host with two users is two hosts.

Under a batch scheduler the allocation is the hostfile: see
:func:`hosts_from_environment` for Slurm and PBS.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

__all__ = [
    "DEFAULT_AGENT_PORT",
    "Host",
    "HostfileError",
    "allocation_source",
    "expand_nodelist",
    "expand_tasks_per_node",
    "hosts_from_environment",
    "parse_hostfile",
    "read_hostfile",
]

#: the most slots (or max_slots) one host may have: more is a typo (slots=1000000 forked ranks until the
#: host gave out; 10**20 wrapped around in MPICH's machinefile, and rank 0 went elsewhere)
MAX_SLOTS = 16384

#: The TCP port a Pydra agent listens on unless a hostfile says ``port=P``.
DEFAULT_AGENT_PORT = 7470

_MAX_PORT = 65535
_SETTINGS = ("slots", "max_slots", "port")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?\Z")  # a portable user name
# Items of a Slurm host list: runs of plain characters and [...] groups.
_NODELIST_ITEM = re.compile(r"(?:[^,\[\]]|\[[^\[\]]*\])+")
_FIRST_BRACKET_GROUP = re.compile(r"([^\[]*)\[([^\]]*)\](.*)")
_TASKS_PER_NODE_ITEM = re.compile(r"([1-9][0-9]*)(?:\(x([1-9][0-9]*)\))?")


@dataclass(frozen=True)
class Host:
    """A node of a job, as a hostfile or batch scheduler describes it."""

    name: str
    slots: int = 1  #: processes to start there
    max_slots: int | None = None  #: oversubscription limit; None means no limit
    port: int = DEFAULT_AGENT_PORT  #: the port of the node's Pydra agent
    user: str | None = None  #: who to run as on a system agent (None: the launcher's login name)

    @property
    def label(self) -> str:
        """``user@name``, or the name alone when no user is given."""
        return f"{self.user}@{self.name}" if self.user else self.name


class HostfileError(ValueError):
    """A hostfile, or a scheduler's description of the allocation, is malformed."""


def read_hostfile(path: str | os.PathLike[str]) -> list[Host]:
    """Read the hosts listed in the hostfile at *path*."""
    with open(path, encoding="utf-8") as file:
        return parse_hostfile(file.read(), source=os.fspath(path))


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[Host]:
    """Parse hostfile *text*; *source* names it in error messages."""
    hosts = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.partition("#")[0].strip()
        if entry:
            try:
                hosts.append(_parse_entry(entry))
            except ValueError as error:
                raise HostfileError(f"{source}:{number}: {error}") from None
    if not hosts:
        raise HostfileError(f"{source}: no hosts listed")
    return _merge_duplicates(hosts)


def _parse_entry(entry: str) -> Host:
    first, *settings = entry.split()
    name, colon, slots_text = first.partition(":")
    user, at, name = name.rpartition("@")
    if not name or "=" in name or (at and not _USER.match(user)):
        raise ValueError(f"expected a host name first (or user@host), got {first!r}")
    values = {"slots": slots_text} if colon else {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or key not in _SETTINGS:
            raise ValueError(f"expected slots=N, max_slots=N or port=N, got {setting!r}")
        if key in values:
            raise ValueError(f"{key} is given twice for {name}")
        values[key] = value
    slots = _positive_int("slots", values.get("slots", "1"))
    max_slots = _positive_int("max_slots", values["max_slots"]) if "max_slots" in values else None
    if max_slots is not None and max_slots < slots:
        raise ValueError(f"max_slots ({max_slots}) must not be less than slots ({slots})")
    if max(slots, max_slots or 0) > MAX_SLOTS:
        raise ValueError(f"{'slots' if slots > MAX_SLOTS else 'max_slots'}={max(slots, max_slots or 0)} is more "
                         f"processes than one host runs (at most {MAX_SLOTS})")
    port = _positive_int("port", values.get("port", str(DEFAULT_AGENT_PORT)))
    if port > _MAX_PORT:
        raise ValueError(f"port must be at most {_MAX_PORT}, got {port}")
    return Host(name, slots, max_slots, port, user or None)


def _positive_int(key: str, text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise ValueError(f"{key} must be a positive integer, got {text!r}")
    return int(text)


def _merge_duplicates(hosts: Iterable[Host]) -> list[Host]:
    merged: dict[tuple[str, int, str | None], Host] = {}  # keeps each host where it first appeared
    for host in hosts:
        earlier = merged.get((host.name, host.port, host.user))
        if earlier is not None:
            max_slots = None  # unlimited if either line leaves it unlimited
            if earlier.max_slots is not None and host.max_slots is not None:
                max_slots = earlier.max_slots + host.max_slots
            host = Host(host.name, earlier.slots + host.slots, max_slots, host.port, host.user)
        merged[host.name, host.port, host.user] = host
    return list(merged.values())


# --- batch schedulers -------------------------------------------------------


def hosts_from_environment(env: Mapping[str, str] = os.environ, port: int = DEFAULT_AGENT_PORT) -> list[Host] | None:
    """Return the hosts of the batch allocation this process runs in, or None.

    Slurm: ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``) names the nodes and
    ``SLURM_TASKS_PER_NODE`` gives their slots (one each if it is unset).
    PBS/Torque: ``PBS_NODEFILE`` names a file listing each node once per slot.
    Every host's agent is taken to listen on *port*. Returns None outside of
    such an allocation.
    """
    hosts = None
    for variable in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(variable):
            hosts = _slurm_hosts(variable, env[variable], env.get("SLURM_TASKS_PER_NODE"))
            break
    else:
        if env.get("PBS_NODEFILE"):
            # One line per slot: merging the repeated names adds up their slots.
            hosts = read_hostfile(env["PBS_NODEFILE"])
    return None if hosts is None else [replace(host, port=port) for host in hosts]


def allocation_source(env: Mapping[str, str] = os.environ) -> str:
    """The variable that describes this process's allocation, to name it in messages."""
    for variable in ("SLURM_TASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "PBS_NODEFILE"):
        if env.get(variable):
            return f"{variable}={env[variable]}"
    return "the allocation"


def _slurm_hosts(variable: str, nodelist: str, tasks_per_node: str | None) -> list[Host]:
    try:
        names = expand_nodelist(nodelist)
    except ValueError as error:
        raise HostfileError(f"{variable}={nodelist!r}: {error}") from None
    if tasks_per_node is None:
        return [Host(name) for name in names]
    try:
        slots = expand_tasks_per_node(tasks_per_node)
    except ValueError as error:
        raise HostfileError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r}: {error}") from None
    if len(slots) != len(names):
        raise HostfileError(
            f"SLURM_TASKS_PER_NODE={tasks_per_node!r} describes {len(slots)} nodes, "
            f"but {variable}={nodelist!r} names {len(names)}"
        )
    return [Host(name, count) for name, count in zip(names, slots, strict=True)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as ``node[01-04,07],gpu[1-2],login1``.

    Zero padding is kept (``node[08-10]`` gives node08, node09, node10) and
    several bracket groups multiply out (``r[1-2]n[1-2]`` gives r1n1, r1n2,
    r2n1, r2n2).  Raises ValueError for a malformed list.
    """
    items = _NODELIST_ITEM.findall(nodelist)
    if ",".join(items) != nodelist:  # something was skipped: stray brackets or commas
        raise ValueError("expected names like node[01-04,07] separated by commas")
    return [name for item in items for name in _expand_brackets(item)]


def _expand_brackets(item: str) -> list[str]:
    match = _FIRST_BRACKET_GROUP.fullmatch(item)
    if match is None:
        return [item]
    prefix, ranges, rest = match.groups()
    return [
        prefix + number + tail
        for number in _expand_ranges(ranges)
        for tail in _expand_brackets(rest)
    ]


def _expand_ranges(ranges: str) -> list[str]:
    """Expand ``01-04,07`` into 01, 02, 03, 04, 07, keeping the zero padding."""
    numbers: list[str] = []
    for part in ranges.split(","):
        first, dash, last = part.partition("-")
        last = last if dash else first
        if not (first.isascii() and first.isdigit() and last.isascii() and last.isdigit()):
            raise ValueError(f"expected a number or a range like 01-04, got {part!r}")
        if int(first) > int(last):
            raise ValueError(f"range {part!r} runs backwards")
        numbers.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return numbers


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's ``SLURM_TASKS_PER_NODE`` syntax: ``2(x3),1`` gives [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = _TASKS_PER_NODE_ITEM.fullmatch(part)
        if match is None:
            raise ValueError(f"expected N or N(xM) with positive N and M, got {part!r}")
        counts.extend([int(match[1])] * int(match[2] or 1))
    return counts
