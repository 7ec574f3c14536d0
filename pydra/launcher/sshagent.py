"""Signing with a key held by ``ssh-agent``, and lending the launcher's key to its own helpers.

The part of the ssh-agent protocol (draft-miller-ssh-agent) that Pydra needs:
``SSH2_AGENTC_REQUEST_IDENTITIES`` to list the agent's keys and
``SSH2_AGENTC_SIGN_REQUEST`` to have one of them sign. Every message is a
uint32 length, a type byte and its contents, over the Unix socket named by
``SSH_AUTH_SOCK``. An Ed25519 signature does not depend on who computes it,
so an :class:`AgentKey` signs Pydra's AUTH message exactly as the private key
itself would, without this process ever holding that key.

:class:`KeyLender` is the other side of the same protocol, for one key: ``pydra
launch`` serves the key it holds (decrypted with a passphrase, say) to the
``pydra-remote-exec`` helpers that mpiexec starts, for the job's lifetime, on a
socket in a directory only the launching user can enter.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pydra.comm.channel import AuthenticationError, Identity
from pydra.launcher import keys
from pydra.launcher.private import PrivateSocketServer
from pydra.launcher.sshwire import WireReader, ssh_string, uint32

__all__ = ["AgentError", "AgentKey", "KeyLender", "agent_keys", "signing_socket", "socket_path"]

FAILURE = 5
REQUEST_IDENTITIES = 11
IDENTITIES_ANSWER = 12
SIGN_REQUEST = 13
SIGN_RESPONSE = 14

TIMEOUT = 30.0  # long enough for an agent that asks its user to confirm (ssh-add -c)
_MAX_MESSAGE = 256 * 1024  # what OpenSSH's agent accepts too


class AgentError(Exception):
    """ssh-agent is unreachable, refused a request, or answered nonsense."""


def socket_path() -> str | None:
    """The agent's socket, from ``SSH_AUTH_SOCK`` (OpenSSH's variable, not a Pydra setting), or None."""
    return os.environ.get("SSH_AUTH_SOCK") or None


def _request(path: str, kind: int, body: bytes) -> WireReader:
    """Send one request to the agent at *path*; return a reader of the answer after its type byte."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            agent.settimeout(TIMEOUT)
            agent.connect(path)
            agent.sendall(ssh_string(bytes([kind]) + body))
            length = struct.unpack(">I", _receive(agent, 4))[0]
            if not 1 <= length <= _MAX_MESSAGE:
                raise AgentError(f"ssh-agent at {path} sent a message of {length} bytes")
            answer = WireReader(_receive(agent, length))
    except OSError as error:
        raise AgentError(f"cannot use ssh-agent at {path}: {error.strerror or error}") from None
    if answer.byte() == FAILURE:
        raise AgentError(f"ssh-agent at {path} refused the request")
    return answer


def _receive(connection: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = connection.recv(length - len(data))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        data += chunk
    return data


class AgentKey:
    """An Ed25519 key held by an ssh-agent: signs like an ``Ed25519PrivateKey`` (a channel ``Identity``)."""

    def __init__(self, path: str, public_key: Ed25519PublicKey, comment: str = "") -> None:
        self.socket_path = path
        self.comment = comment
        self._public_key = public_key
        self._blob = keys.public_key_blob(keys.public_key_bytes(public_key))

    def public_key(self) -> Ed25519PublicKey:
        """The key's public half."""
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        """The agent's Ed25519 signature of *data*; ``AuthenticationError`` if it cannot sign."""
        try:
            answer = _request(self.socket_path, SIGN_REQUEST, ssh_string(self._blob) + ssh_string(data) + uint32(0))
            signature = WireReader(answer.string())
            algorithm, raw = signature.string(), signature.string()
            if algorithm != keys.KEY_TYPE.encode():
                raise AgentError(f"ssh-agent signed with {algorithm.decode(errors='replace')}, not {keys.KEY_TYPE}")
            # Checked here so that a confused agent is named, not reported by the peer as a bad proof.
            self._public_key.verify(raw, data)
        except (AgentError, ValueError, InvalidSignature) as error:
            reason = "its signature does not verify" if isinstance(error, InvalidSignature) else error
            raise AuthenticationError(f"ssh-agent cannot sign with {keys.sha256_fingerprint(self._public_key)}: {reason}") from None
        return raw


def agent_keys(path: str) -> list[AgentKey]:
    """The Ed25519 keys the agent at *path* holds, in its order (other key types are left out)."""
    answer = _request(path, REQUEST_IDENTITIES, b"")
    found = []
    try:
        for _ in range(answer.uint32()):
            blob, comment = answer.string(), answer.string().decode("utf-8", "replace")
            try:
                found.append(AgentKey(path, keys.parse_public_key_blob(blob), comment))
            except ValueError:
                continue  # an RSA or ECDSA key, say: Pydra uses Ed25519 only
    except ValueError:
        raise AgentError(f"ssh-agent at {path} sent a malformed list of keys") from None
    return found


class KeyLender(PrivateSocketServer):
    """An ssh-agent for one key, to this user's processes alone, until closed.

    A connection from another uid is closed unanswered (see :mod:`pydra.launcher.private`).
    """

    timeout = TIMEOUT

    def __init__(self, key: Ed25519PrivateKey, directory: str | None = None) -> None:
        self._key = key
        self._blob = keys.public_key_blob(keys.public_key_bytes(key))
        super().__init__("pydra-agent-", "agent", directory)

    def answer(self, client: socket.socket, ours: bool) -> None:
        if not ours:
            return
        try:
            while True:
                length = struct.unpack(">I", _receive(client, 4))[0]
                if not 1 <= length <= _MAX_MESSAGE:
                    return
                client.sendall(ssh_string(self._reply(WireReader(_receive(client, length)))))
        except OSError:  # the helper is done (it closes after one request)
            return

    def _reply(self, request: WireReader) -> bytes:
        try:
            kind = request.byte()
            if kind == REQUEST_IDENTITIES:
                return bytes([IDENTITIES_ANSWER]) + uint32(1) + ssh_string(self._blob) + ssh_string(b"pydra launch")
            if kind == SIGN_REQUEST and request.string() == self._blob:
                signature = ssh_string(keys.KEY_TYPE.encode()) + ssh_string(self._key.sign(request.string()))
                return bytes([SIGN_RESPONSE]) + ssh_string(signature)
        except ValueError:
            pass
        return bytes([FAILURE])


@contextlib.contextmanager
def signing_socket(identity: Identity, directory: str | None = None) -> Iterator[str]:
    """An ssh-agent socket that signs as *identity* while the block runs: its own agent's, or a :class:`KeyLender`'s.

    A lender's socket goes in *directory* (private), if given.
    """
    if isinstance(identity, AgentKey):
        yield identity.socket_path
        return
    if not isinstance(identity, Ed25519PrivateKey):
        raise TypeError(f"cannot lend a {type(identity).__name__}")
    with KeyLender(identity, directory) as lender:
        yield lender.path
