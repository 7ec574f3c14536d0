"""Ed25519 identity keys, stored in OpenSSH's file formats.

Pydra authenticates users and nodes with Ed25519 keys.  They are stored
exactly as OpenSSH stores them, so ``ssh-keygen`` can create, inspect and
re-encrypt Pydra keys, and Pydra can use keys made by ``ssh-keygen``:

* ``PATH`` holds the private key in the ``-----BEGIN OPENSSH PRIVATE KEY-----``
  format (specified in OpenSSH's ``PROTOCOL.key``), optionally protected by a
  passphrase with bcrypt-pbkdf and aes256-ctr, as ``ssh-keygen`` does;
* ``PATH.pub`` holds the public key as one line, ``ssh-ed25519 AAAA... comment``.

Keys live in :func:`pydra_home` (``~/.pydra`` unless ``$PYDRA_HOME`` is set):
``id_ed25519`` identifies the user and ``host_ed25519`` identifies a node.

Which key signs for a user, and how a passphrase is obtained (a file, a
prompt, or ``ssh-agent`` holding the key instead), is
:mod:`pydra.launcher.identity`'s job.

Reading passphrase-protected keys needs the optional ``bcrypt`` package
(``pip install pydra-mpi[bcrypt]``); everything else needs only
``cryptography``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import getpass
import hashlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pydra import strictmodes
from pydra.config import pydra_home  # noqa: F401  (callers find it here too)
from pydra.launcher.sshwire import WireReader, ssh_string, uint32

__all__ = [
    "HOST_KEY_NAME",
    "IDENTITY_NAME",
    "KEY_TYPE",
    "KeyFileError",
    "PassphraseRequired",
    "WrongPassphrase",
    "UnsupportedKeyTypeError",
    "fingerprint",
    "generate_keypair",
    "host_key_path",
    "identity_path",
    "keygen_main",
    "load_private_key",
    "load_public_key",
    "parse_public_key_blob",
    "parse_public_key_line",
    "public_key_blob",
    "public_key_bytes",
    "public_key_line",
    "pydra_home",
    "sha256_fingerprint",
]

KEY_TYPE = "ssh-ed25519"  #: the only key type Pydra uses
IDENTITY_NAME = "id_ed25519"  #: file name of a user's key in pydra_home()
HOST_KEY_NAME = "host_ed25519"  #: file name of a node's host key in pydra_home()

_ED25519_KEY_LENGTH = 32

# The private key container, as described in OpenSSH's PROTOCOL.key.
_MAGIC = b"openssh-key-v1\0"
_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_END = "-----END OPENSSH PRIVATE KEY-----"
_LINE_LENGTH = 70  # what ssh-keygen writes; any length is accepted on reading
_PLAIN_BLOCK_SIZE = 8  # padding unit of an unencrypted private section

# Passphrase protection, with ssh-keygen's defaults for new keys.
_CIPHER = "aes256-ctr"
_KDF = "bcrypt"
_KDF_ROUNDS = 16
_SALT_LENGTH = 16
_AES_KEY_LENGTH = 32
_AES_BLOCK_SIZE = 16

# Every base64-encoded SSH key starts with "AAAA": the blob begins with the
# 4-byte length of the key type name, whose first three bytes are zero.
_PUBLIC_KEY_LINE = re.compile(r"\s*\S+\s+AAAA")


class KeyFileError(Exception):
    """A key file is malformed, or needs a passphrase that was not given (an unsafe one: StrictModeError)."""


class PassphraseRequired(KeyFileError):
    """A key file is encrypted and no passphrase was given; ``public_key`` is its (clear) public key."""

    def __init__(self, message: str, public_key: Ed25519PublicKey) -> None:
        super().__init__(message)
        self.public_key = public_key


class WrongPassphrase(KeyFileError):
    """The passphrase given does not decrypt the key file."""


class UnsupportedKeyTypeError(ValueError):
    """A public key of a type other than ssh-ed25519, which Pydra does not use."""


def identity_path() -> Path:
    """Return the default path of the user's private key."""
    return pydra_home() / IDENTITY_NAME


def host_key_path() -> Path:
    """Return the default path of this node's private host key."""
    return pydra_home() / HOST_KEY_NAME


# --- public keys ------------------------------------------------------------


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> bytes:
    """Return the raw 32-byte Ed25519 public key of *key*.

    *key* may be a private key, a public key, or raw public key bytes (which
    are checked and returned unchanged).
    """
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    if len(key) != _ED25519_KEY_LENGTH:
        raise ValueError(f"an ed25519 public key has 32 bytes, got {len(key)}")
    return bytes(key)


def sha256_fingerprint(public_key: Ed25519PublicKey | bytes) -> str:
    """Return the short fingerprint of a public key, ``SHA256:<base64>``."""
    digest = hashlib.sha256(public_key_blob(public_key_bytes(public_key))).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint(public_key: Ed25519PublicKey | bytes, comment: str = "") -> str:
    """Return the fingerprint line exactly as ``ssh-keygen -lf`` prints it.

    For example ``256 SHA256:uInnajh2Ow2h... alice@box (ED25519)``.
    """
    return f"256 {sha256_fingerprint(public_key)} {comment or 'no comment'} (ED25519)"


def public_key_line(public_key: Ed25519PublicKey | bytes, comment: str = "") -> str:
    """Return the one-line text form of a public key, as in ``.pub`` files."""
    blob = public_key_blob(public_key_bytes(public_key))
    return f"{KEY_TYPE} {base64.b64encode(blob).decode()} {comment}".rstrip()


def parse_public_key_line(line: str) -> tuple[Ed25519PublicKey, str]:
    """Parse ``ssh-ed25519 AAAA... [comment]`` into the key and its comment.

    Raises :class:`UnsupportedKeyTypeError` for other key types and
    :class:`ValueError` for anything that is not a valid key line.
    """
    fields = line.strip().split(None, 2)
    if len(fields) < 2:
        raise ValueError("expected 'ssh-ed25519 <base64 key> [comment]'")
    key_type, encoded = fields[:2]
    if key_type != KEY_TYPE:
        raise UnsupportedKeyTypeError(f"{key_type} keys are not supported, only {KEY_TYPE}")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("the key is not valid base64") from None
    comment = fields[2] if len(fields) == 3 else ""
    return parse_public_key_blob(blob), comment


def load_public_key(path_or_line: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a public key from a ``.pub`` file or from a key line itself.

    A string that looks like ``ssh-ed25519 AAAA...`` is parsed as a key line;
    anything else is the path of a file holding one such line.
    """
    if isinstance(path_or_line, str) and _PUBLIC_KEY_LINE.match(path_or_line):
        try:
            return parse_public_key_line(path_or_line)[0]
        except ValueError as error:
            raise KeyFileError(f"bad public key: {error}") from None
    return _read_public_key_file(Path(path_or_line))[0]


def _read_public_key_file(path: Path) -> tuple[Ed25519PublicKey, str]:
    first_line = path.read_text(encoding="utf-8", errors="replace").strip().partition("\n")[0]
    try:
        return parse_public_key_line(first_line)
    except ValueError as error:
        raise KeyFileError(f"{path}: {error}") from None


def public_key_blob(raw_key: bytes) -> bytes:
    """The SSH wire form of a raw Ed25519 public key (what ``.pub`` lines hold in base64)."""
    return ssh_string(KEY_TYPE.encode()) + ssh_string(raw_key)


def parse_public_key_blob(blob: bytes) -> Ed25519PublicKey:
    """Parse the SSH wire form of an Ed25519 public key; ValueError for anything else."""
    reader = WireReader(blob)
    key_type = reader.string().decode("ascii", "replace")
    if key_type != KEY_TYPE:
        raise ValueError(f"the key data holds a {key_type} key, not {KEY_TYPE}")
    raw_key = reader.string()
    reader.expect_end()
    if len(raw_key) != _ED25519_KEY_LENGTH:
        raise ValueError(f"an ed25519 public key has 32 bytes, got {len(raw_key)}")
    return Ed25519PublicKey.from_public_bytes(raw_key)


# --- private keys -----------------------------------------------------------


def generate_keypair(
    path: str | os.PathLike[str],
    comment: str = "",
    passphrase: str | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Create a new key pair in *path* and *path*.pub; return its fingerprint.

    The fingerprint is formatted as :func:`fingerprint` formats it.  An empty
    or missing *passphrase* leaves the private key unencrypted, so that agents
    can start without a person typing it.  Existing files are replaced only if
    *overwrite* is true; otherwise :class:`FileExistsError` is raised.
    """
    private_path = Path(path)
    public_path = _public_path(private_path)
    if not overwrite:
        for existing in (private_path, public_path):
            if existing.exists():
                raise FileExistsError(
                    errno.EEXIST, "a key already exists, refusing to replace it", str(existing)
                )
    key = Ed25519PrivateKey.generate()
    # Like ~/.ssh, the key directory is private to its owner.
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_data = _encode_private_key(key, comment, passphrase)
    public_data = (public_key_line(key.public_key(), comment) + "\n").encode()
    _write_new_file(private_path, private_data, 0o600, replace=overwrite)
    _write_new_file(public_path, public_data, 0o644, replace=overwrite)
    return fingerprint(key.public_key(), comment)


def load_private_key(
    path: str | os.PathLike[str], passphrase: str | None = None
) -> Ed25519PrivateKey:
    """Load an OpenSSH Ed25519 private key, decrypting it with *passphrase*.

    Like OpenSSH, refuses a key file that its group or other users can access,
    and (strict modes) one owned by another user or in a directory others can
    write: :class:`~pydra.strictmodes.StrictModeError`.
    """
    path = Path(path)
    text = strictmodes.read_bytes(path, strictmodes.Kind.SECRET).decode("utf-8", "replace")
    return _decrypt_private_key(_parse_private_key_file(text, path), path, passphrase)[0]


def _public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def _write_new_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    # The mode is given to os.open itself so that the file never exists with
    # looser permissions, not even for a moment.  A file being replaced is
    # removed first because O_CREAT would keep its (maybe looser) mode.
    if replace:
        path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with open(descriptor, "wb") as file:
        file.write(data)


@dataclass(frozen=True)
class _PrivateKeyFile:
    """The parts of an OpenSSH private key file that are readable without a passphrase."""

    cipher: str
    kdf_options: bytes
    public_key: Ed25519PublicKey
    private_section: bytes  # encrypted unless cipher is "none"


def _encode_private_key(key: Ed25519PrivateKey, comment: str, passphrase: str | None) -> bytes:
    public = public_key_bytes(key)
    check = os.urandom(4)  # written twice; a mismatch on reading means a wrong passphrase
    section = (
        check
        + check
        + ssh_string(KEY_TYPE.encode())
        + ssh_string(public)
        + ssh_string(key.private_bytes_raw() + public)  # OpenSSH stores seed + public key
        + ssh_string(comment.encode())
    )
    if passphrase:
        cipher, kdf, block_size = _CIPHER, _KDF, _AES_BLOCK_SIZE
        salt = os.urandom(_SALT_LENGTH)
        kdf_options = ssh_string(salt) + uint32(_KDF_ROUNDS)
    else:
        cipher, kdf, block_size = "none", "none", _PLAIN_BLOCK_SIZE
        kdf_options = b""
    section += bytes(range(1, 1 + -len(section) % block_size))  # padding 1, 2, 3, ...
    if passphrase:
        encryptor = _passphrase_cipher(passphrase, salt, _KDF_ROUNDS).encryptor()
        section = encryptor.update(section) + encryptor.finalize()
    blob = (
        _MAGIC
        + ssh_string(cipher.encode())
        + ssh_string(kdf.encode())
        + ssh_string(kdf_options)
        + uint32(1)  # number of keys in the file
        + ssh_string(public_key_blob(public))
        + ssh_string(section)
    )
    encoded = base64.b64encode(blob).decode()
    lines = [encoded[i : i + _LINE_LENGTH] for i in range(0, len(encoded), _LINE_LENGTH)]
    return "\n".join([_BEGIN, *lines, _END, ""]).encode()


def _parse_private_key_file(text: str, path: Path) -> _PrivateKeyFile:
    try:
        body = text.strip()
        if not (body.startswith(_BEGIN) and body.endswith(_END)):
            raise ValueError(f"not an OpenSSH private key (expected {_BEGIN})")
        blob = base64.b64decode("".join(body[len(_BEGIN) : -len(_END)].split()), validate=True)
        if not blob.startswith(_MAGIC):
            raise ValueError("not an OpenSSH private key (bad magic bytes)")
        reader = WireReader(blob[len(_MAGIC) :])
        cipher = reader.string().decode("ascii", "replace")
        kdf = reader.string().decode("ascii", "replace")
        kdf_options = reader.string()
        if reader.uint32() != 1:
            raise ValueError("files holding several keys are not supported")
        public_key = parse_public_key_blob(reader.string())
        private_section = reader.string()
        reader.expect_end()
    except binascii.Error:
        raise KeyFileError(f"{path}: the key is not valid base64") from None
    except ValueError as error:
        raise KeyFileError(f"{path}: {error}") from None
    if (cipher, kdf) not in (("none", "none"), (_CIPHER, _KDF)):
        raise KeyFileError(
            f"{path} is encrypted with {cipher}/{kdf}, which pydra cannot read; "
            f"re-encrypt it with: ssh-keygen -p -Z {_CIPHER} -f {path}"
        )
    return _PrivateKeyFile(cipher, kdf_options, public_key, private_section)


def _decrypt_private_key(
    file: _PrivateKeyFile, path: Path, passphrase: str | None
) -> tuple[Ed25519PrivateKey, str]:
    """Return the private key in *file* and its comment."""
    section = file.private_section
    encrypted = file.cipher != "none"
    if encrypted:
        if not passphrase:
            raise PassphraseRequired(f"{path} is protected by a passphrase, but none was given", file.public_key)
        try:
            options = WireReader(file.kdf_options)
            salt, rounds = options.string(), options.uint32()
            if not salt or rounds < 1:
                raise ValueError("empty salt or zero rounds")
        except ValueError:
            raise KeyFileError(f"{path}: malformed bcrypt parameters") from None
        decryptor = _passphrase_cipher(passphrase, salt, rounds).decryptor()
        section = decryptor.update(section) + decryptor.finalize()
    reader = WireReader(section)
    try:
        if reader.uint32() != reader.uint32():
            raise ValueError("check bytes differ")
        key_type = reader.string().decode("ascii", "replace")
        public = reader.string()
        private = reader.string()
        comment = reader.string().decode("utf-8", "replace")
        padding = reader.rest()
    except ValueError:
        if encrypted:
            raise WrongPassphrase(f"wrong passphrase for {path}") from None
        raise KeyFileError(f"{path}: the private key is corrupt") from None
    if key_type != KEY_TYPE:
        raise KeyFileError(f"{path} holds a {key_type} key, not {KEY_TYPE}")
    # The public key is stored three times; all copies must agree with the seed.
    seed, public_copy = private[:_ED25519_KEY_LENGTH], private[_ED25519_KEY_LENGTH:]
    expected = public_key_bytes(file.public_key)
    if len(seed) != _ED25519_KEY_LENGTH or not public == public_copy == expected:
        raise KeyFileError(f"{path}: the private key is corrupt")
    if padding != bytes(range(1, len(padding) + 1)):
        raise KeyFileError(f"{path}: the private key is corrupt (bad padding)")
    key = Ed25519PrivateKey.from_private_bytes(seed)
    if public_key_bytes(key) != expected:
        raise KeyFileError(f"{path}: the private key does not match its public key")
    return key, comment


def _passphrase_cipher(passphrase: str, salt: bytes, rounds: int) -> Cipher[modes.CTR]:
    bcrypt = _import_bcrypt()
    # OpenSSH uses few rounds (16 by default); bcrypt warns about that unless told.
    material = bcrypt.kdf(
        passphrase.encode(),
        salt,
        _AES_KEY_LENGTH + _AES_BLOCK_SIZE,
        rounds,
        ignore_few_rounds=True,
    )
    key, counter = material[:_AES_KEY_LENGTH], material[_AES_KEY_LENGTH:]
    return Cipher(algorithms.AES(key), modes.CTR(counter))


def _import_bcrypt() -> ModuleType:
    # bcrypt is an optional extra: only passphrase-protected keys need it.
    try:
        import bcrypt
    except ImportError:
        raise ImportError(
            "passphrase-protected keys need the bcrypt package; "
            "install it with: pip install pydra-mpi[bcrypt]"
        ) from None
    return bcrypt


# --- the `pydra keygen` command ---------------------------------------------


def _fingerprint_of_file(path: Path) -> str:
    """Return what ``ssh-keygen -lf PATH`` prints for a key file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if _BEGIN not in text:
        return fingerprint(*_read_public_key_file(path))
    # Like ssh-keygen, prefer the comment in PATH.pub, then the one inside an
    # unencrypted private key; an encrypted key's comment cannot be read.
    if _public_path(path).exists():
        return fingerprint(*_read_public_key_file(_public_path(path)))
    file = _parse_private_key_file(text, path)
    if file.cipher == "none":
        key, comment = _decrypt_private_key(file, path, None)
        return fingerprint(key.public_key(), comment)
    return fingerprint(file.public_key)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Keep usage errors to one line, like every other error of the command.
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def keygen_main(argv: list[str] | None = None) -> int:
    """Run ``pydra keygen``; return the exit status (0, 1 failure, 2 bad usage/input)."""
    parser = _ArgumentParser(
        prog="pydra keygen",
        description=(
            "Create an Ed25519 key pair for Pydra, or show a key's fingerprint.\n"
            "Keys use OpenSSH's formats, so ssh-keygen can read and make them too."
        ),
        epilog=(
            "examples:\n"
            "  pydra keygen                    create ~/.pydra/id_ed25519 and id_ed25519.pub\n"
            "  pydra keygen -f ~/.pydra/host_ed25519 -C node01\n"
            "  pydra keygen -l -f ~/.pydra/id_ed25519.pub\n"
            "\n"
            "exit status: 0 success, 1 failure (e.g. cannot write the file),\n"
            "2 bad usage or bad key file (including an existing key without --force)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-f",
        dest="path",
        metavar="PATH",
        type=Path,
        help="private key file; the public key goes to PATH.pub "
        "(default: id_ed25519 in $PYDRA_HOME, or in ~/.pydra)",
    )
    parser.add_argument(
        "-C",
        dest="comment",
        metavar="COMMENT",
        help="comment stored with the key (default: user@hostname)",
    )
    parser.add_argument(
        "-N",
        dest="passphrase",
        metavar="PASSPHRASE",
        default="",
        help="protect the private key with PASSPHRASE (needs bcrypt); pydra launch and "
        "pydra shell unlock it with --passphrase-file, ssh-agent or a prompt. The default is "
        "no passphrase, which a host key needs: pydra node starts unattended",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing key at PATH")
    parser.add_argument(
        "-l",
        dest="show_fingerprint",
        action="store_true",
        help="print the fingerprint of PATH (a private key or .pub file) "
        "exactly as ssh-keygen -lf does, instead of creating a key",
    )
    args = parser.parse_args(argv)
    path = args.path or identity_path()
    try:
        if args.show_fingerprint:
            print(_fingerprint_of_file(path))
            return 0
        if path.is_dir():
            print(f"pydra keygen: {path} is a directory; give the key's file name", file=sys.stderr)
            return 2
        existing = [file for file in (path, _public_path(path)) if file.exists()]
        if existing and not args.force:
            print(
                f"pydra keygen: {existing[0]} already exists (use --force to replace it)",
                file=sys.stderr,
            )
            return 2
        comment = args.comment
        if comment is None:
            comment = f"{getpass.getuser()}@{socket.gethostname()}"
        key_fingerprint = generate_keypair(path, comment, args.passphrase, overwrite=args.force)
    except (KeyFileError, FileNotFoundError, IsADirectoryError) as error:
        print(f"pydra keygen: {_describe(error)}", file=sys.stderr)
        return 2
    except (ImportError, OSError) as error:
        print(f"pydra keygen: {_describe(error)}", file=sys.stderr)
        return 1
    print(f"Your identification has been saved in {path}")
    print(f"Your public key has been saved in {_public_path(path)}")
    print("The key fingerprint is:")
    print(key_fingerprint)
    return 0
