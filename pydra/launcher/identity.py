"""Which key signs for you in ``pydra launch`` and ``pydra shell``: a key file, or ``ssh-agent``.

:func:`load_identity` turns ``-i PATH`` (default ``~/.pydra/id_ed25519``) and
``--passphrase-file FILE`` into something that signs, trying in order:

1. an unencrypted private key file: used as it is;
2. an encrypted one: decrypted with the passphrase in ``--passphrase-file``
   (a file of yours that nobody else may read, like a key: strict modes), else
   signed for by ``ssh-agent`` if it holds that key (``ssh-add PATH`` once, and
   no passphrase is asked again), else decrypted with a passphrase typed at
   the terminal, if stdin is one (three tries, as ssh-add allows);
3. a ``.pub`` file: the key ``ssh-agent`` holds with that public key;
4. no file at the default path: the first Ed25519 key ``ssh-agent`` holds.

So an existing ``~/.ssh/id_ed25519`` works as ``-i ~/.ssh/id_ed25519``, and,
once in ``ssh-agent``, with no Pydra key file at all.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pydra import strictmodes
from pydra.comm.channel import Identity
from pydra.launcher import keys, sshagent

__all__ = ["PROMPT_TRIES", "add_identity_arguments", "load_identity", "read_passphrase_file"]

PROMPT_TRIES = 3


def add_identity_arguments(parser: argparse.ArgumentParser, key: str = "your private key") -> None:
    """``-i`` and ``--passphrase-file``, as ``pydra launch`` and ``pydra shell`` take them (*key*: whose key)."""
    parser.add_argument("-i", "--identity", type=Path, metavar="PATH",
                        help=f"{key}, or the .pub of such a key in ssh-agent (default ~/.pydra/id_ed25519, "
                             "or without it the first ed25519 key in ssh-agent)")
    parser.add_argument("--passphrase-file", type=Path, metavar="FILE",
                        help="the passphrase of your key, on the first line of FILE (yours, mode 600); without it "
                             "ssh-agent signs if it holds the key, else you are asked on a terminal")


def missing_file(error: FileNotFoundError, given: Path | None, where: str) -> str:
    """What to tell a user whose key file (or another file *error* names) is missing: the key's, what to do.

    *given* is the ``-i`` path, if any; *where* says where the new key's .pub line goes.
    """
    if error.filename != str(given or keys.identity_path()):
        return f"{(error.strerror or 'no such file').lower()}: {error.filename}"
    # the usual first stumble: say what to do
    return f"no key at {error.filename}: make one with `pydra keygen`, then add its .pub line {where}"


def load_identity(path: str | os.PathLike[str] | None = None, passphrase_file: Path | None = None) -> Identity:
    """Return what signs for the user (see the module's docstring); *path* None means the default key.

    Raises :class:`~pydra.launcher.keys.KeyFileError` (one line saying what
    to do for a key that needs a passphrase none gave), ``OSError`` (a missing
    file), :class:`~pydra.strictmodes.StrictModeError` or
    :class:`~pydra.launcher.sshagent.AgentError`.
    """
    default = path is None
    path = keys.identity_path() if path is None else Path(path)
    if path.suffix == ".pub":
        held = _agent_key(keys.load_public_key(path))
        if held is None:
            unset = "" if sshagent.socket_path() else " (SSH_AUTH_SOCK is not set)"
            raise keys.KeyFileError(f"no ssh-agent holds the key of {path}{unset}")
        return held
    try:
        return keys.load_private_key(path)
    except FileNotFoundError:
        agent = sshagent.socket_path()
        if not default or agent is None:
            raise
        held = sshagent.agent_keys(agent)
        if not held:
            raise keys.KeyFileError(f"no key at {path}, and ssh-agent holds no ed25519 key (make one with "
                                    "`pydra keygen`, or ssh-add one)") from None
        return held[0]
    except keys.PassphraseRequired as locked:
        if passphrase_file is not None:
            return keys.load_private_key(path, read_passphrase_file(passphrase_file))
        agent_problem = ""
        try:
            held = _agent_key(locked.public_key)
        except sshagent.AgentError as error:  # a stale SSH_AUTH_SOCK: the terminal may still do
            held, agent_problem = None, f" ({error})"
        if held is not None:
            return held
        if sys.stdin is not None and sys.stdin.isatty():
            return _prompt(path)
        raise keys.KeyFileError(
            f"{locked}: use --passphrase-file FILE, a terminal, or ssh-add it to ssh-agent{agent_problem}"
        ) from None


def read_passphrase_file(path: Path) -> str:
    """The passphrase in *path*: its first line (strict modes: yours, and private like a key)."""
    text = strictmodes.read_bytes(path, strictmodes.Kind.SECRET).decode("utf-8")
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise keys.KeyFileError(f"{path}: the passphrase file is empty")
    return lines[0]


def _agent_key(public_key: Ed25519PublicKey) -> sshagent.AgentKey | None:
    """The agent's key with this public key, if an agent is running and holds it."""
    agent = sshagent.socket_path()
    if agent is None:
        return None
    wanted = keys.public_key_bytes(public_key)
    return next((key for key in sshagent.agent_keys(agent) if keys.public_key_bytes(key.public_key()) == wanted), None)


def _prompt(path: Path) -> Ed25519PrivateKey:
    tries = PROMPT_TRIES
    while True:
        try:
            passphrase = getpass.getpass(f"Enter passphrase for {path}: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # the prompt's line was not ended
            raise keys.KeyFileError(f"no passphrase given for {path}") from None
        try:
            return keys.load_private_key(path, passphrase)
        except keys.WrongPassphrase:
            tries -= 1
            if not tries:
                raise
            print("Bad passphrase, try again.", file=sys.stderr)
