"""pydra.launcher.scratch: a launch's temporary directory, swept by a later launch once no launch holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pydra.launcher import scratch

HOLD = """
import sys, time
from pydra.launcher.scratch import Scratch
held = Scratch()
print(held.path, flush=True)
time.sleep(600)
"""


@pytest.fixture
def tmpdir_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setenv("TMPDIR", str(root))
    return root


def aged(path: str) -> None:
    """Make a launch directory's lock look two minutes old (a directory just made is never swept)."""
    past = time.time() - 120
    os.utime(os.path.join(path, "lock"), (past, past))


def test_a_directory_left_by_a_killed_launch_is_swept_and_a_held_one_is_not(tmpdir_of_its_own: Path) -> None:
    holders = [subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                                start_new_session=True) for _ in range(2)]
    try:
        killed, running = (holder.stdout.readline().strip() for holder in holders)  # type: ignore[union-attr]
        holders[0].kill()  # kill -9: it removes nothing, and the kernel drops its lock
        holders[0].wait()
        for path in (killed, running):
            assert Path(path).parent == tmpdir_of_its_own and Path(path).is_dir()
            aged(path)
        assert scratch.sweep() == [killed]
        assert not Path(killed).exists() and Path(running).is_dir()
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
            holder.wait()


def test_a_new_directory_a_link_and_someone_elses_name_are_left_alone(tmpdir_of_its_own: Path) -> None:
    fresh = Path(tempfile.mkdtemp(prefix=scratch.PREFIX))
    (fresh / "lock").write_text("")  # unlocked, but made just now: its launch may be about to lock it
    target = tmpdir_of_its_own / "elsewhere"
    target.mkdir()
    (target / "lock").write_text("")
    aged(str(target))
    (tmpdir_of_its_own / f"{scratch.PREFIX}link").symlink_to(target)
    no_lock = Path(tempfile.mkdtemp(prefix=scratch.PREFIX))
    assert scratch.sweep() == []
    assert fresh.is_dir() and target.is_dir() and no_lock.is_dir()


def test_a_scratch_directory_is_private_and_gone_once_closed(tmpdir_of_its_own: Path) -> None:
    with scratch.Scratch() as held:
        assert os.stat(held.path).st_mode & 0o777 == 0o700
        Path(held.path, "hosts.txt").write_text("a:1\n")
    assert not os.path.exists(held.path)
