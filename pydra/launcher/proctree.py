"""Processes by parent links, from ``/proc`` (Linux): what a command started, wherever it put it.

Hydra's proxy starts every rank in a session of its own, so a command's
process group is not all of it: stopping a command means stopping its tree.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from typing import NamedTuple

#: seconds between two looks at whether a stopped tree has ended
_POLL = 0.05


def stat_fields(pid: int | str) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name: the first is field 3 (the state), field N is [N - 3].

    Raises OSError if there is no such process (or no /proc). (The
    supervisor, which imports nothing of Pydra, reads the state itself.)
    """
    with open(f"/proc/{pid}/stat", "rb") as stat:
        # The command name, in parentheses, may hold spaces and parentheses itself.
        return stat.read().rsplit(b")", 1)[1].split()


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group), for every process now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = stat_fields(entry)
                table[int(entry)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):  # ended while we looked
                continue
    return table


def parents() -> dict[int, int]:
    """pid -> parent pid, for every process now."""
    return {pid: parent for pid, (parent, _) in _table().items()}


def children(pid: int) -> list[int]:
    """The processes whose parent is *pid*."""
    return [child for child, parent in parents().items() if parent == pid]


def tree(*roots: int) -> set[int]:
    """*roots* and every process below them."""
    return _below(parents(), roots)


def _below(table: dict[int, int], roots: tuple[int, ...] | list[int]) -> set[int]:
    found, frontier = set(), set(roots)
    while frontier:
        found |= frontier
        frontier = {child for child, parent in table.items() if parent in frontier} - found
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL *pid*'s process group (it leads one) and every process below it, in any session."""
    # The tree first: once a parent dies its children are reparented, and the links are lost.
    doomed = tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _kill(doomed)


def _kill(pids: set[int]) -> None:
    for each in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, signal.SIGKILL)


class Stopped(NamedTuple):
    """What :func:`stop_tree` did: how many processes it found, and how many of them it had to kill."""

    found: int
    killed: int


async def stop_tree(pid: int, grace: float, leader: bool = True) -> Stopped:
    """Stop *pid*'s process group (it leads one) and every process below it: SIGTERM, then SIGKILL after *grace* s.

    SIGTERM first lets MPI's daemons stop their ranks and remove their files
    (Open MPI's ``/tmp/prted.PID``, Hydra's topology files), which SIGKILL does
    not. Both signals go through pidfds, which name one process for as long as
    it exists: a pid that ends in the grace and is given to a new process is
    not signalled. Returns once every process found has ended, or been sent
    SIGKILL (found and killed, counted); cancelled, it sends SIGKILL at once. Without pidfds (Linux before
    5.3, or no descriptor left), SIGKILL at once to what it found.

    ``leader=False`` says *pid* itself has ended and been reaped: its pid may
    now be another process's, so only what is left of its group, and below
    that, is stopped (a group's id is not reused while the group has members).
    """
    table = _table()
    group = {p for p, (_, of) in table.items() if of == pid}  # holds what was reparented before we looked
    members = _below({p: parent for p, (parent, _) in table.items()}, [pid] if leader else list(group)) | group
    try:
        handles = _open(members)
    except OSError:  # no pidfd_open here, or no descriptor left
        _kill(members)
        return Stopped(len(members), len(members))
    import asyncio  # here: `pydra run -n` imports this module (jobwatch) and has no use for asyncio's 28 ms

    try:
        _send(handles, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        while _running(handles) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(_POLL)
    finally:
        # What the grace left, and what it started meanwhile (the parent links of a live process still hold).
        with contextlib.suppress(OSError):  # out of descriptors: what was found first is killed all the same
            handles.update(_open(tree(*_running(handles)) - handles.keys()))
        left = _running(handles)
        _send({p: handles[p] for p in left}, signal.SIGKILL)
        for handle in handles.values():
            os.close(handle)
    return Stopped(len(handles), len(left))


def _open(pids: set[int]) -> dict[int, int]:
    """pid -> pidfd, for those of *pids* that still exist (OSError if this kernel has no pidfds)."""
    handles = {}
    for pid in pids:
        try:
            handles[pid] = os.pidfd_open(pid)
        except ProcessLookupError:  # ended meanwhile
            continue
        except OSError:
            for handle in handles.values():
                os.close(handle)
            raise
    return handles


def _running(handles: dict[int, int]) -> list[int]:
    """The pids of *handles* whose process has not ended (a pidfd turns readable when it does)."""
    poller = select.poll()
    for handle in handles.values():
        poller.register(handle, select.POLLIN)
    ended = {handle for handle, _ in poller.poll(0)}
    return [pid for pid, handle in handles.items() if handle not in ended]


def _send(handles: dict[int, int], signum: int) -> None:
    for handle in handles.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):  # (PermissionError: setuid since)
            signal.pidfd_send_signal(handle, signum)
