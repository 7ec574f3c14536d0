"""``proctree``: a command's tree is stopped whole, even the part in a session of its own (as Hydra's ranks)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydra.launcher import proctree

# A parent that starts a child in a new session, prints the child's pid, then waits.
PARENT = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
          " start_new_session=True); print(child.pid, flush=True); time.sleep(60)")


def test_kill_tree_reaches_a_child_in_its_own_session() -> None:
    child = None
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert proctree.children(parent.pid) == [child]
        assert proctree.tree(parent.pid) == {parent.pid, child}
        proctree.kill_tree(parent.pid)
        assert parent.wait(timeout=30) < 0
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1][:3]:
            assert time.monotonic() < deadline, "the child in its own session survived"
            time.sleep(0.05)
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# A command that says when SIGTERM reaches it, then ends (or, with IGNORE, stays), and a child in its own session
# that does the same: a parent link is all that ties it to the command, as Hydra's ranks to their proxy.
STOPPABLE = """
import os, signal, subprocess, sys, time
mark, ignore = sys.argv[1], sys.argv[2] == "ignore"
def stopped(signum, frame):
    with open(mark, "a") as out:
        out.write(f"{os.getpid()} got SIGTERM\\n")
    if not ignore:
        sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
open(f"{mark}.ready-{os.getpid()}", "w").close()
if len(sys.argv) < 4:
    child = subprocess.Popen([sys.executable, __file__, mark, sys.argv[2], "child"], start_new_session=True)
    print(child.pid, flush=True)
while True:
    time.sleep(0.05)
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int, Path]:
    script, mark = tmp_path / "stoppable.py", tmp_path / "mark"
    script.write_text(STOPPABLE)
    parent = subprocess.Popen([sys.executable, str(script), str(mark), mode], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not all(Path(f"{mark}.ready-{pid}").exists() for pid in (parent.pid, child)):  # their handlers are set
        assert time.monotonic() < deadline, "the stoppable tree did not start"
        time.sleep(0.05)
    return parent, child, mark


def _gone(pid: int) -> bool:
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    except OSError:
        return True


def _wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while not _gone(pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _cleanup(parent: subprocess.Popen, child: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    if parent.poll() is None:
        parent.kill()
    parent.wait()


def test_stop_tree_lets_the_whole_tree_handle_sigterm(tmp_path: Path) -> None:
    parent, child, mark = _start(tmp_path, "end")
    try:
        assert asyncio.run(proctree.stop_tree(parent.pid, grace=60)) == (2, 0)  # found, killed
        assert parent.wait(timeout=30) == 0  # it ended by its handler, not by SIGKILL
        assert sorted(mark.read_text().splitlines()) == sorted(f"{pid} got SIGTERM" for pid in (parent.pid, child))
        assert _gone(child)
    finally:
        _cleanup(parent, child)


def test_stop_tree_kills_what_ignores_sigterm_once_the_grace_is_over(tmp_path: Path) -> None:
    parent, child, mark = _start(tmp_path, "ignore")
    try:
        assert asyncio.run(proctree.stop_tree(parent.pid, grace=1)) == (2, 2)
        assert parent.wait(timeout=30) == -signal.SIGKILL
        assert len(mark.read_text().splitlines()) == 2  # both were asked first
        _wait_gone(child, "the child in its own session survived")
    finally:
        _cleanup(parent, child)


def test_a_cancelled_stop_kills_at_once(tmp_path: Path) -> None:
    parent, child, mark = _start(tmp_path, "ignore")

    async def cancel_in_the_grace() -> None:
        stopping = asyncio.ensure_future(proctree.stop_tree(parent.pid, grace=3600))
        while not (mark.exists() and len(mark.read_text().splitlines()) == 2):
            await asyncio.sleep(0.05)
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping

    try:
        asyncio.run(asyncio.wait_for(cancel_in_the_grace(), 60))
        assert parent.wait(timeout=30) == -signal.SIGKILL
    finally:
        _cleanup(parent, child)


def test_without_its_leader_only_what_is_left_of_the_group_is_stopped(tmp_path: Path) -> None:
    # The leader (a shell) has ended and been reaped; its background process is still in its group.
    leader = subprocess.Popen(["/bin/sh", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    left = int(leader.stdout.readline())
    try:
        assert leader.wait(timeout=30) == 0
        assert asyncio.run(proctree.stop_tree(leader.pid, grace=60, leader=False)) == (1, 0)
        _wait_gone(left, "the group's member survived")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(left, signal.SIGKILL)


def test_without_pidfds_the_tree_is_killed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfds(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    parent, child, mark = _start(tmp_path, "end")
    try:
        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
        assert asyncio.run(proctree.stop_tree(parent.pid, grace=60)) == (2, 2)
        assert parent.wait(timeout=30) == -signal.SIGKILL
        assert not mark.exists()  # no SIGTERM first
        _wait_gone(child, "the child in its own session survived")
    finally:
        _cleanup(parent, child)
