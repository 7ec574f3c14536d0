"""Run directories: where a run keeps its journal and results, one private directory per run.

``pydra run`` and ``pydra serve`` make one with :func:`new_run_dir` unless told
``--run-dir``; the journal (:mod:`pydra.journal`) lives inside it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path

from pydra.config import pydra_home

__all__ = ["default_runs_dir", "make_private_dirs", "new_run_dir"]

# Characters kept from a target in a run directory's name; anything else becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_STEM_LENGTH = 40


def default_runs_dir() -> Path:
    """Return where run directories go by default: ``pydra_home() / "runs"``."""
    return pydra_home() / "runs"


def new_run_dir(target: str, base: Path | None = None) -> Path:
    """Create a fresh, private run directory for *target* under *base* and return it.

    Its name is ``<UTC YYYYmmdd-HHMMSS>-<target stem>-<4 random hex digits>``, so
    a listing sorts by start time and says what ran. *base* (default
    :func:`default_runs_dir`) and any missing parent are created mode 0o700.
    """
    base = Path(base) if base is not None else default_runs_dir()
    make_private_dirs(base)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    stem = _target_stem(target)
    while True:
        path = base / f"{stamp}-{stem}-{os.urandom(2).hex()}"  # (secrets would import hashlib and hmac: ~6 ms)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # two runs of the same target in the same second drew the same suffix
        os.chmod(path, 0o700)  # mkdir's mode is subject to the umask
        return path


def _target_stem(target: str) -> str:
    # "examples/pi.py:Pi" -> "pi_Pi", "package.module:Name" -> "package.module_Name"
    name = re.split(r"[/\\]", target)[-1]
    where, sep, attribute = name.rpartition(":")
    if sep and where.endswith(".py"):
        name = f"{where[:-3]}:{attribute}"
    elif name.endswith(".py"):
        name = name[:-3]
    stem = _UNSAFE.sub("_", name).strip("_")[:_STEM_LENGTH]
    return stem or "run"


def make_private_dirs(path: Path) -> None:
    """Create *path* and each missing parent with mode 0o700 (what exists already is left alone)."""
    # Path.mkdir(parents=True) would give the parents the default mode, not 0o700.
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        os.chmod(directory, 0o700)


#: the file a run keeps locked while it uses its run directory (pydra.journal.Journal holds it)
LOCK_NAME = "lock"


def claim(run_dir: Path) -> int | None:
    """Take *run_dir* for this process: the descriptor to close to let go, or None if another process has it.

    An ``flock`` on ``run_dir/lock``, which the kernel drops when its holder
    ends, however it ends: a resume after a killed rank 0 is not refused.
    Where the file system cannot lock (some NFS mounts), the run goes ahead
    unguarded.
    """
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        return fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for the message of the run refused (holder)
    return fd


def holder(run_dir: Path) -> str:
    """Who has *run_dir* (see :func:`claim`), as far as its lock file says."""
    try:
        pid = (run_dir / LOCK_NAME).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"
