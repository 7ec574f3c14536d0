"""Privilege separation for ``pydra node --system``: each launch runs as the user whose file allowed it.

A system agent runs as root, like sshd, and keeps the host key to itself. A
launch names a local user (``"user"`` in its request, see docs/PROTOCOL.md);
the agent then

1. looks the user up (:func:`lookup`): unknown names and uid 0 are refused,
   so nothing a launch asks for ever runs as root;
2. reads that user's ``~/.pydra/authorized_keys`` *as that user*
   (:func:`reading_as`: effective uid, gid and groups switched for the read,
   as sshd's ``temporarily_use_uid``), under strict modes for that user: the
   file and every directory up to the user's home must be owned by the user
   or root and writable by nobody else (:mod:`pydra.strictmodes`). Reading as
   the user means a symbolic link to a file the user may not read is not
   followed into it;
3. checks the launch key against that file alone (:class:`SystemUsers`): a
   key in one user's file never runs anything as another user;
4. starts the command as the user (:func:`spawn_options`: ``setgroups`` with
   the user's groups as ``initgroups`` computes them, ``setgid``, then
   ``setuid``, done by :mod:`subprocess` between fork and exec), with the
   user's login shell, in the user's home, with umask 022 and a clean
   environment (:func:`clean_environment`): ``HOME``, ``USER``, ``LOGNAME``,
   ``SHELL``, a fixed ``PATH``, and only those of the request's variables
   whose names Pydra and MPI use (``PYDRA_*`` and MPI's settings, as sshd's
   ``AcceptEnv``). Nothing of the agent's own environment reaches a command.

There is no PAM: account locks and expiry in ``/etc/shadow`` and PAM limits
are not applied (docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydra import strictmodes
from pydra.comm.aio import Channel
from pydra.config import setting
from pydra.launcher import keys
from pydra.launcher.authorized import AuthorizationError, AuthorizedKeysFile
from pydra.launcher.environment import PREFIXES
from pydra.launcher.remote import Command, Refused

__all__ = [
    "SAFE_PATH",
    "USER_KEYS",
    "Account",
    "SystemUsers",
    "clean_environment",
    "lookup",
    "reader_for",
    "reading_as",
    "spawn_options",
]

#: the PATH every command of a system agent starts with (sshd's default for users)
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: where a user's ``authorized_keys`` is, in the user's home
USER_KEYS = Path(".pydra", "authorized_keys")
# A portable user name (POSIX, plus the trailing $ of Samba machine accounts).
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Account:
    """A local user a system agent runs commands as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  #: every group of the user, as initgroups(3) would set them
    home: Path
    shell: str

    @property
    def authorized_keys(self) -> Path:
        """The user's ``~/.pydra/authorized_keys``."""
        return self.home / USER_KEYS


def lookup(name: object) -> Account:
    """The local user *name*; :class:`Refused` for a malformed or unknown name, or for root."""
    if not isinstance(name, str) or not _USER_NAME.match(name):
        raise Refused(f"no valid user name in the request (got {name!r})")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise Refused(f"no local user {name!r}") from None
    if entry.pw_uid == 0:
        raise Refused(f"user {name!r} has uid 0: a system agent never runs a command as root")
    return Account(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=Path(entry.pw_dir or "/"),
        shell=entry.pw_shell or "/bin/sh",
    )


@contextlib.contextmanager
def reading_as(account: Account) -> Iterator[None]:
    """Act as *account* (effective uid, gid and groups) inside the block; root again after it.

    Only the effective ids change: the real and saved uid stay 0, so the user
    can neither signal nor trace the agent meanwhile. Keep the block short and
    free of ``await``: the ids are the whole process's.
    """
    saved_groups = os.getgroups()
    os.setgroups(list(account.groups))
    try:
        os.setegid(account.gid)
        try:
            os.seteuid(account.uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(0)
    finally:
        os.setgroups(saved_groups)


def reader_for(account: Account) -> Callable[[Path], bytes]:
    """How a system agent reads *account*'s files: as the user (:func:`reading_as`), under strict modes for the user."""

    def read_as_user(path: Path) -> bytes:
        with reading_as(account):
            return strictmodes.read_bytes(path)

    return read_as_user


def clean_environment(account: Account, requested: dict[str, Any]) -> dict[str, str]:
    """A command's whole environment: who it runs as, :data:`SAFE_PATH`, and the accepted requested names.

    The request may name ``PYDRA_*`` and MPI's settings (the prefixes
    ``pydra launch`` forwards); anything else, ``LD_PRELOAD`` and
    ``PYTHONPATH`` included, is :class:`Refused` rather than dropped, so a
    launch never runs with less than it asked for without saying so. A job's
    own variables reach its ranks through MPI (``pydra launch --env``), not
    through this request.
    """
    env = {"HOME": str(account.home), "USER": account.name, "LOGNAME": account.name,
           "SHELL": account.shell, "PATH": SAFE_PATH}
    for name, value in requested.items():
        if not (isinstance(name, str) and _ENV_NAME.match(name) and name.startswith(PREFIXES)):
            raise Refused(f"a system agent takes only PYDRA_* and MPI settings in a request's env, not {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise Refused(f"the value of {name} in the request is not a string")
        env[name] = value
    return env


def spawn_options(account: Account) -> dict[str, Any]:
    """What :mod:`subprocess` needs to start a command as *account*.

    Between fork and exec, subprocess calls ``setgroups``, then ``setregid``,
    then ``setreuid``, the order that leaves no group of root's behind. The
    command starts in the home directory (``/`` if there is none, as sshd does).
    """
    return {
        "user": account.uid,
        "group": account.gid,
        "extra_groups": list(account.groups),
        "cwd": str(account.home) if account.home.is_dir() else "/",
        "umask": 0o022,
    }


class SystemUsers:
    """The runner of ``pydra node --system`` (:class:`pydra.launcher.remote.Runner`).

    Authorizes each request against the ``authorized_keys`` of the user it
    names, and runs it as that user. Keeps one
    :class:`~pydra.launcher.authorized.AuthorizedKeysFile` per user (so each
    logs its skipped lines once, and again when it changes), and remembers
    which file allowed each running channel, for the revocation on SIGHUP
    (:class:`pydra.launcher.sessions.Sessions`).
    """

    def __init__(self, role: str, log: logging.Logger) -> None:
        self.role = role
        self.log = log
        # An authenticated key that no file allows yet holds its channel this long at most.
        self.request_timeout: float | None = setting("LOGIN_GRACE_TIME")
        self._files: dict[Account, AuthorizedKeysFile] = {}
        self._allowed_by: weakref.WeakKeyDictionary[Channel, AuthorizedKeysFile] = weakref.WeakKeyDictionary()

    def prepare(self, channel: Channel, request: dict[str, Any]) -> Command:
        """Run *request* as the user it names, if that user's file allows the key; :class:`Refused` otherwise."""
        account = self._authorize(channel, request.get("user"))
        try:
            env = clean_environment(account, request.get("env") or {})
        except Refused as refusal:
            self.log.warning("refused the request of %s from %s as %s: %s",
                             keys.sha256_fingerprint(channel.peer_key), channel.peer_address, account.name, refusal)
            raise
        return Command(account.shell, env, f"{account.name} (uid {account.uid})", spawn_options(account), account.name)

    def keyfile_of(self, channel: Channel) -> AuthorizedKeysFile | None:
        """The file that allowed *channel*, or None before its request was authorized."""
        return self._allowed_by.get(channel)

    def _authorize(self, channel: Channel, name: object) -> Account:
        """The account *name*, if its file allows *channel*'s key; every refusal logged, with the reason."""
        who = keys.sha256_fingerprint(channel.peer_key)
        shown = name if isinstance(name, str) and _USER_NAME.match(name) else repr(name)[:40]
        try:
            account = lookup(name)
            keyfile = self._file(account)
            line = keyfile.authorize(channel.peer_key, channel.peer_address, self.role)
        except (Refused, AuthorizationError) as refusal:
            self.log.warning("refused %s from %s as %s: %s", who, channel.peer_address, shown, refusal)
            channel.refused()  # its source is penalised as for a refused key (PYDRA_PER_SOURCE_PENALTIES)
            # The launcher learns no more than ssh's "Permission denied": not whether the user exists.
            raise Refused(f"client not authorized as {shown}") from None
        channel.authorized()
        self._allowed_by[channel] = keyfile
        self.log.info("accepted %s from %s as %s (%s)", who, channel.peer_address, account.name, line.location)
        return account

    def _file(self, account: Account) -> AuthorizedKeysFile:
        keyfile = self._files.get(account)
        if keyfile is None:
            keyfile = self._files[account] = AuthorizedKeysFile(account.authorized_keys, self.log, reader_for(account))
        return keyfile
