"""``proctree``: a command's tree is stopped whole, even the part in a session of its own (as Hydra's ranks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
