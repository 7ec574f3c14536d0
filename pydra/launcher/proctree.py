"""Processes by parent links, from ``/proc`` (Linux): what a command started, wherever it put it.

Hydra's proxy starts every rank in a session of its own, so a command's
process group is not all of it: stopping a command means stopping its tree.
"""

from __future__ import annotations

import contextlib
import os
import signal


def parents() -> dict[int, int]:
    """pid -> parent pid, for every process now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    # (the command name, in parentheses, may hold spaces and parentheses itself)
                    table[int(entry)] = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # ended while we looked
                continue
    return table


def children(pid: int) -> list[int]:
    """The processes whose parent is *pid*."""
    return [child for child, parent in parents().items() if parent == pid]


def tree(*roots: int) -> set[int]:
    """*roots* and every process below them."""
    table = parents()
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
    for each in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, signal.SIGKILL)
