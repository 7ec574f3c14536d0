"""A launch's temporary files: one private directory, locked while in use, swept by a later launch if left behind.

``pydra launch`` puts its machinefile and its two private sockets (the key
lender's, :mod:`pydra.launcher.sshagent`, and the connector's,
:mod:`pydra.launcher.netns`) in one directory of mode 0700 under the
temporary directory, and removes it when it ends. A launch killed outright
(``kill -9``) removes nothing; so the directory holds a lock file, locked
(``flock``) for the launch's life, and the kernel drops that lock however
the launch ends. Each new launch removes every such directory of this user
whose lock it can take.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import time

PREFIX = "pydra-launch-"
_LOCK = "lock"
#: a directory's lock is looked at only once it is this old: one just made may not be locked yet
_SETTLED_SECONDS = 60.0


class Scratch:
    """A launch's private temporary directory (:attr:`path`), locked until :meth:`close`."""

    def __init__(self) -> None:
        sweep()
        self.path = tempfile.mkdtemp(prefix=PREFIX)  # mode 0700: ours alone
        self._lock = os.open(os.path.join(self.path, _LOCK), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def close(self) -> None:
        """Remove the directory and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sweep(root: str | None = None) -> list[str]:
    """Remove this user's launch directories under *root* (the temporary directory) that no launch holds.

    Only a directory (not a link) owned by this user, whose lock file is
    older than a minute and not locked, is removed; returns their paths.
    """
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = [entry for entry in os.scandir(root) if entry.name.startswith(PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue  # someone else's, or a link planted in a shared /tmp
            lock = os.open(os.path.join(entry.path, _LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # no lock file (yet): not ours to judge
        try:
            if time.time() - os.fstat(lock).st_mtime < _SETTLED_SECONDS:
                continue
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its launch runs
        else:
            shutil.rmtree(entry.path, ignore_errors=True)  # (rmtree does not follow links inside it)
            removed.append(entry.path)
        finally:
            os.close(lock)
    return removed
