"""A second local user for the tests of who may write what: made by the test (as root), removed after it.

:func:`second_user` is a context manager: ``useradd --create-home`` on entry;
on exit every process of the user is stopped by pid (never by name), then
``userdel -r``, retried while those processes go away. Callers skip when not
root (:data:`CAN_ADD_USERS`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CAN_ADD_USERS = os.geteuid() == 0 and shutil.which("useradd") is not None and shutil.which("userdel") is not None


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path


@contextlib.contextmanager
def second_user(home: bool = True) -> Iterator[User]:
    """A new local user (with a home directory, unless not *home*), removed on exit."""
    name = f"pydra{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--create-home" if home else "--no-create-home", name], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    finally:
        remove_user(name)


def remove_user(name: str) -> None:
    """SIGKILL every process of *name* by pid, then ``userdel -r`` (retried while they go away)."""
    uid = pwd.getpwnam(name).pw_uid
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in status.splitlines()):
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    while subprocess.run(["userdel", "-r", name], capture_output=True).returncode not in (0, 6):  # 6: no such user
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not remove the test user {name}")
        time.sleep(0.2)


@contextlib.contextmanager
def reachable_by_others(path: str | os.PathLike[str]) -> Iterator[None]:
    """Let other users reach *path* (o+x on each directory above it that lacks it), restored on exit.

    The test machine runs as root, with Python under /root (mode 0700): a
    second user running the venv's Python needs to pass through /root.
    """
    changed = []
    try:
        for directory in reversed(Path(os.path.realpath(path)).parents):
            mode = directory.stat().st_mode & 0o7777
            if not mode & 0o001:
                directory.chmod(mode | 0o001)
                changed.append((directory, mode))
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)


def authorize(user: User, line: str) -> Path:
    """Write *line* as *user*'s ``~/.pydra/authorized_keys``, the way the user would (0700 directory, 0600 file)."""
    directory = user.home / ".pydra"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "authorized_keys"
    path.write_text(line + "\n")
    path.chmod(0o600)
    for owned in (directory, path):
        os.chown(owned, user.uid, user.gid)
    return path


@pytest.fixture(scope="module")
def other_user() -> Iterator[User]:
    """A second local user for a test module, removed after it (skips when not root)."""
    if not CAN_ADD_USERS:
        pytest.skip("needs root to create a second user")
    with second_user() as user:
        yield user
