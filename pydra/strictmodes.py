"""Strict modes: refuse a trust file that someone else could have written, as OpenSSH's ``StrictModes`` does.

A file Pydra trusts is only as trustworthy as everyone who can change it. The
agent (``authorized_keys``, its host key), the launcher (your key,
``known_hosts``), the admin endpoint (``authorized_keys``) and the shell (your
key, a cluster's connection file) check a file before they believe it:

* the file is a regular file owned by you or by root, and neither its group
  nor others may write it; a private key may not even be read by them;
* every directory above it, up to your home directory (or up to ``/`` for a
  file outside it), is owned by you or by root and writable by nobody else, so
  no one else can swap the file or a directory on its way. Higher up than the
  directory holding the file, and outside ``PYDRA_HOME``, a root-owned
  directory with the sticky bit, such as ``/tmp``, passes: others cannot
  rename or remove what is not theirs in it. This is OpenSSH's rule, which
  refuses even ``/tmp``, relaxed by that one case;
* a cluster's connection file, which tells the shell where to send your
  commands, must be your own (not even root's), in a directory that you own
  and that only you can write.

Both the path as given and the file it resolves to (through symbolic links)
are checked. A refusal is one line that names the file and what is wrong, and
says how to fix it::

    refusing /home/u/.pydra/authorized_keys: writable by others (mode 0666); chmod go-w /home/u/.pydra/authorized_keys

Files are checked through the descriptor they are read from
(:func:`read_bytes`), so what is checked is what is read.

"You" is the effective user: ``pydra node --system`` checks a user's
``authorized_keys`` while acting as that user (:mod:`pydra.launcher.privsep`),
so the file must be that user's or root's, up to that user's home.
"""

from __future__ import annotations

import enum
import os
import pwd
import stat
from pathlib import Path

from pydra.config import setting
from pydra.errors import PydraError

__all__ = ["Kind", "StrictModeError", "check_directory", "check_file", "read_bytes"]

_ROOT = 0


class StrictModeError(PydraError):
    """A trust file, or a directory above it, could have been written by someone else."""

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str = "") -> None:
        self.path = str(path)
        super().__init__(f"refusing {path}: {problem}" + (f"; {fix}" if fix else ""))


class Kind(enum.Enum):
    """What a file is to Pydra, which decides how strictly it is checked."""

    TRUST = "trust"  #: authorized_keys, known_hosts: yours or root's, writable by you alone
    SECRET = "secret"  #: a private key: also unreadable by group and others
    OWN = "own"  #: a connection file: yours alone, in a directory only you can write


def check_file(path: str | os.PathLike[str], kind: Kind = Kind.TRUST) -> None:
    """Check *path* (which must exist) and the directories above it; raise :class:`StrictModeError`."""
    if os.name != "posix":  # no owners and mode bits to check
        return
    _check_file_status(path, os.stat(path), kind)
    _check_directories_above(path, kind)


def read_bytes(path: str | os.PathLike[str], kind: Kind = Kind.TRUST) -> bytes:
    """Open *path*, check the open file and the directories above it, and return its contents.

    Raises :class:`StrictModeError`, or the ``OSError`` of opening the file
    (``FileNotFoundError`` for a missing one).
    """
    with open(path, "rb") as file:
        if os.name == "posix":
            _check_file_status(path, os.fstat(file.fileno()), kind)
            _check_directories_above(path, kind)
        return file.read()


def check_directory(path: str | os.PathLike[str], private: bool = False) -> None:
    """Check that directory *path* and those above it are writable by you (and root) alone.

    With *private*, *path* must be your own (not root's), with no sticky-bit
    exception: only you may add files to it.
    """
    if os.name != "posix":
        return
    _check_directory(path, os.stat(path), path, strict=True, private=private)
    _check_directories_above(path, Kind.TRUST)


# -- the checks ----------------------------------------------------------------------------------


def _check_file_status(path: str | os.PathLike[str], status: os.stat_result, kind: Kind) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise StrictModeError(path, "not a regular file")
    me = os.geteuid()
    if status.st_uid != me and (kind is Kind.OWN or status.st_uid != _ROOT):
        whose = "yours" if kind is Kind.OWN else "yours or root's"
        raise StrictModeError(path, f"{_owned_by(status.st_uid)}; only files that are {whose} are trusted")
    mode = stat.S_IMODE(status.st_mode)
    if kind is Kind.SECRET and mode & 0o077:
        raise StrictModeError(path, f"{_who_may(mode, 0o077)} (mode {mode:04o})", f"chmod 600 {path}")
    if mode & 0o022:
        raise StrictModeError(path, f"{_who_may(mode, 0o022)} (mode {mode:04o})", f"chmod go-w {path}")


def _check_directory(
    directory: str | os.PathLike[str],
    status: os.stat_result,
    refused: str | os.PathLike[str],
    *,
    strict: bool,
    private: bool,
) -> None:
    """Check one directory; the error names *refused*, the file that is not trusted because of it.

    A *strict* one (holding the file, or in PYDRA_HOME) gets no sticky-bit
    pass: others could add the files it lacks. A *private* one must be yours,
    not even root's.
    """
    prefix = "" if str(directory) == str(refused) else f"directory {directory} is "
    if not stat.S_ISDIR(status.st_mode):
        raise StrictModeError(refused, f"{prefix}not a directory")
    me = os.geteuid()
    mode = stat.S_IMODE(status.st_mode)
    if status.st_uid != me and (private or status.st_uid != _ROOT):
        whose = "yours" if private else "yours or root's"
        raise StrictModeError(refused, f"{prefix}{_owned_by(status.st_uid)}; only directories that are {whose} are trusted")
    if mode & 0o022 and (strict or status.st_uid != _ROOT or not mode & stat.S_ISVTX):
        raise StrictModeError(refused, f"{prefix}{_who_may(mode, 0o022)} (mode {mode:04o})", f"chmod go-w {directory}")


def _check_directories_above(path: str | os.PathLike[str], kind: Kind) -> None:
    holding = _parents(path)
    pydra_home = os.path.realpath(Path(setting("HOME")).expanduser())
    for directory in _directories_above(path):
        real = os.path.realpath(directory)
        # No sticky-bit pass for the directory holding the file, nor in PYDRA_HOME: others could add what is missing.
        strict = directory in holding or real == pydra_home or real.startswith(pydra_home + os.sep)
        # Whoever may write the directory holding a connection file could have put it there.
        private = kind is Kind.OWN and directory in holding
        _check_directory(directory, os.stat(directory), path, strict=strict, private=private)


def _parents(path: str | os.PathLike[str]) -> set[str]:
    """The directory holding *path*, as given and as resolved."""
    return {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}


def _directories_above(path: str | os.PathLike[str]) -> list[str]:
    """Every directory whose owner could replace *path*: above it as given and as resolved.

    The walk stops at the home directory, like OpenSSH's: its owner is you, and
    what is above it is the system's. A path outside it is walked up to ``/``.
    The two directories holding *path* come first.
    """
    homes = {os.path.abspath(_home()), os.path.realpath(_home())}
    chains = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        chain, directory = [], os.path.dirname(start)
        while True:
            chain.append(directory)
            parent = os.path.dirname(directory)
            if directory in homes or parent == directory:
                break
            directory = parent
        chains.append(chain)
    ordered = [chains[0][0], chains[1][0], *chains[0][1:], *chains[1][1:]]
    return list(dict.fromkeys(ordered))  # without repeats, in order


def _home() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir or "/"
    except KeyError:  # a uid with no passwd entry (some containers)
        return str(Path("~").expanduser())


def _owned_by(uid: int) -> str:
    """``owned by bob (uid 1001), not by you (alice)``."""
    owner, me = _name(uid), _name(os.geteuid()) or f"uid {os.geteuid()}"
    return f"owned by {owner} (uid {uid}), not by you ({me})" if owner else f"owned by uid {uid}, not by you ({me})"


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry
        return ""


def _who_may(mode: int, forbidden: int) -> str:
    """``writable by others``, ``readable by its group``...: the worst of *mode*'s bits in *forbidden*."""
    for bit, text in (
        (0o002, "writable by others"),
        (0o020, "writable by its group"),
        (0o004, "readable by others"),
        (0o040, "readable by its group"),
        (0o001, "usable by others"),
        (0o010, "usable by its group"),
    ):
        if mode & forbidden & bit:
            return text
    raise AssertionError("no forbidden bit is set")
