"""Pydra's authenticated, encrypted channel as a sans-IO state machine.

A `Connection` is one end of a channel.  It never touches a socket: feed it the bytes you read
with `receive_data`, pull events out with `next_event`, and write whatever `send` and
`data_to_send` return.  `pydra.comm.aio` drives it over asyncio streams.

The protocol (docs/PROTOCOL.md has the byte layouts):

1. Noise_NN_25519_ChaChaPoly_SHA256 with the prologue b"pydra/1 " + purpose.  Both ends must
   name the same purpose or the handshake fails; nothing is negotiated.
2. Inside the encrypted transport, the responder proves its Ed25519 identity by signing the
   handshake hash.  Only if that proof holds and `check_peer` accepts the key does the
   initiator send its own proof, so it never reveals its identity to an unverified server.
3. The responder checks the initiator's proof and key, then sends ACCEPT.  From then on both
   sides exchange DATA frames and end with an authenticated CLOSE frame.

Every frame on the wire is a 4-byte big-endian length and that many bytes of body.

The first event `next_event` returns is always `Established` or `Failed`; after `Closed` or
`Failed` it returns that same event forever.  Any error moves the connection to `State.ERROR`.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pydra.comm.noise import TAGLEN, CipherState, DecryptError, HandshakeState, NoiseError

__all__ = [
    "DEFAULT_MAX_FRAME_LENGTH",
    "NEED_DATA",
    "AuthenticationError",
    "ChannelError",
    "Closed",
    "Connection",
    "Data",
    "Established",
    "Event",
    "Failed",
    "HandshakeError",
    "Identity",
    "NeedData",
    "ProtocolError",
    "Refused",
    "Role",
    "State",
    "UsageError",
    "decode_json",
    "encode_json",
    "prologue",
]

PROTOCOL_VERSION = b"pydra/1"
DEFAULT_MAX_FRAME_LENGTH = 1 << 20  #: default limit on a frame body after the channel opens

# Before authentication completes every legitimate frame is tiny (the largest, AUTH, is 113
# bytes), so an unauthenticated peer never gets to make us buffer more than this.
_PREAUTH_FRAME_LIMIT = 256
_HEADER_LENGTH = 4
#: how much of a non-Pydra server's first bytes a refusal quotes
_FIRST_BYTES_SHOWN = 16
_KEY_LENGTH = 32  # raw Ed25519 public key
_SIGNATURE_LENGTH = 64
_PURPOSE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_REFUSAL = "client not authorized"


class ChannelError(Exception):
    """Base class of every error this package reports."""


class HandshakeError(ChannelError):
    """The Noise handshake failed: wrong purpose, tampering, or a timeout."""


class Refused(HandshakeError):
    """The server closed the connection before answering the handshake: busy, or refusing our address."""


class AuthenticationError(ChannelError):
    """An identity proof was malformed, did not verify, or was rejected or refused."""


class ProtocolError(ChannelError):
    """A frame was malformed, too long, out of place, tampered with, replayed or truncated."""


class UsageError(ChannelError):
    """This side used the connection wrongly, for instance sending before it was established."""


class Identity(Protocol):
    """What proves one end's identity: an `Ed25519PrivateKey`, or a key held elsewhere.

    A key in ssh-agent (`pydra.launcher.sshagent.AgentKey`) signs the same bytes without this
    process ever holding the private key.  `sign` is called from `next_event`, so it must be
    quick; it raises `ChannelError` if it cannot sign.
    """

    def public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key whose signatures `sign` makes."""

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of *data*."""


class Role(enum.Enum):
    """Which end of the channel a `Connection` is: the initiator connects, the responder listens."""

    INITIATOR = "initiator"
    RESPONDER = "responder"

    @property
    def peer(self) -> Role:
        """The role of the other end."""
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR


class State(enum.Enum):
    """Where a `Connection` is; each state names what it waits for from the peer."""

    HANDSHAKE = "handshake"  #: the peer's Noise handshake message
    AUTHENTICATING = "authenticating"  #: the peer's AUTH frame
    AWAITING_ACCEPT = "awaiting accept"  #: (initiator only) the responder's ACCEPT frame
    OPEN = "open"  #: DATA or CLOSE frames
    CLOSED = "closed"  #: nothing: the peer has sent CLOSE
    ERROR = "error"  #: nothing: the connection failed


class NeedData(enum.Enum):
    """Type of the `NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"


#: Returned by `Connection.next_event` when it needs more bytes from `receive_data`.
NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True)
class Event:
    """Base class of everything `next_event` returns and `send` accepts."""


@dataclass(frozen=True)
class Established(Event):
    """Both sides are authenticated; DATA may flow.

    `peer_key` is the peer's raw 32-byte Ed25519 public key; `authorization` is what the
    `check_peer` callback returned for it.
    """

    peer_key: bytes
    authorization: object = None


@dataclass(frozen=True)
class Data(Event):
    """Application bytes, received or to send."""

    data: bytes


@dataclass(frozen=True)
class Closed(Event):
    """The authenticated end of the channel, received or to send."""

    reason: str = ""


@dataclass(frozen=True)
class Failed(Event):
    """The connection failed; `error` says why."""

    error: ChannelError


class _FrameType(enum.IntEnum):
    # The first byte of every decrypted frame.
    AUTH = 1
    ACCEPT = 2
    DATA = 3
    CLOSE = 4


# What each state accepts once frames are encrypted.
_EXPECTED_FRAMES = {
    State.AUTHENTICATING: (_FrameType.AUTH,),
    State.AWAITING_ACCEPT: (_FrameType.ACCEPT, _FrameType.CLOSE),
    State.OPEN: (_FrameType.DATA, _FrameType.CLOSE),
}

_AUTH_LABELS = {
    Role.INITIATOR: PROTOCOL_VERSION + b" initiator auth",
    Role.RESPONDER: PROTOCOL_VERSION + b" responder auth",
}


def prologue(purpose: str) -> bytes:
    """The Noise prologue for a channel purpose, e.g. b"pydra/1 launch" for "launch"."""
    if not _PURPOSE.fullmatch(purpose):
        raise ValueError(f"purpose must be 1-64 of [a-z0-9._-], got {purpose!r}")
    return PROTOCOL_VERSION + b" " + purpose.encode("ascii")


class Connection:
    """One end of a Pydra channel.

    `identity` is this side's Ed25519 key, or anything else that signs with one (`Identity`).
    `check_peer` receives the peer's raw public key once the peer has proven it holds the
    matching private key; it raises to reject the peer and may return anything (carried in
    `Established.authorization`).  For an initiator it
    is the known-hosts check of the server; for a responder the authorized-keys check of the
    client.

    An initiator's first handshake message is ready at once: write `data_to_send()` after
    constructing it.  Call `next_event` until it returns `NEED_DATA` before feeding more bytes,
    and write `data_to_send()` after each call: handshake replies are queued there.
    """

    def __init__(
        self,
        role: Role,
        identity: Identity,
        purpose: str,
        check_peer: Callable[[bytes], object],
        *,
        max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
    ) -> None:
        if max_frame_length < _PREAUTH_FRAME_LIMIT:
            raise ValueError(f"max_frame_length must be at least {_PREAUTH_FRAME_LIMIT}")
        self.role = role
        self.purpose = purpose
        self.max_frame_length = max_frame_length
        self.state = State.HANDSHAKE
        self._identity = identity
        self._check_peer = check_peer
        self._handshake = HandshakeState("NN", role is Role.INITIATOR, prologue(purpose))
        # The transport ciphers are set when the Noise handshake completes; until then using
        # them is a bug, and an AttributeError says so loudly.
        self._send_cipher: CipherState
        self._receive_cipher: CipherState
        self._peer_key = b""
        self._authorization: object = None
        self._received = bytearray()
        self._outgoing = bytearray()
        self._received_any = False  # a server that refuses us closes before sending a byte
        self._eof = False
        self._sent_close = False
        self._terminal_event: Closed | Failed | None = None
        if role is Role.INITIATOR:
            self._outgoing += _frame(self._handshake.write_message())

    @property
    def can_send(self) -> bool:
        """Whether `send` would accept an event now."""
        return self.state in (State.OPEN, State.CLOSED) and not self._sent_close

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; b"" means the peer reached end of file."""
        if self._terminal_event is not None:
            return  # nothing will be read any more, so don't keep it
        if not data:
            self._eof = True
        elif self._eof:
            self._fail(UsageError("received data after end of file"))
        else:
            self._received += data
            self._received_any = True

    def next_event(self) -> Event | NeedData:
        """Return the next event from the peer, or `NEED_DATA`.

        Never raises: a failure is returned as a `Failed` event.
        """
        if self._terminal_event is not None:
            return self._terminal_event
        try:
            event = self._process_frames()
        except ChannelError as error:
            return self._fail(error)
        if isinstance(event, Closed):
            self._terminal_event = event
        return event

    def send(self, event: Event) -> bytes:
        """Encrypt a `Data` or `Closed` event and return the bytes to write.

        The result starts with anything still queued in `data_to_send`, so writing it keeps
        frames in order.  Raises `UsageError` if the channel is not open for sending.
        """
        try:
            if not self.can_send:
                reason = "after close" if self._sent_close else f"in state {self.state.value}"
                raise UsageError(f"cannot send {reason}")
            if isinstance(event, Data):
                self._queue(_FrameType.DATA, event.data)
            elif isinstance(event, Closed):
                self._queue(_FrameType.CLOSE, event.reason.encode("utf-8"))
                self._sent_close = True
            else:
                raise UsageError(f"cannot send {type(event).__name__} events")
        except ChannelError as error:
            self._fail(error)
            raise
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        """Return and forget the bytes the protocol itself has queued (handshake, proofs)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -- receiving ---------------------------------------------------------------------------

    def _process_frames(self) -> Event | NeedData:
        # Handshake frames and the first AUTH frame produce no event, so keep going until
        # one does or the bytes run out.
        while True:
            frame = self._take_frame()
            if frame is None:
                if self._eof:
                    if self._received:
                        raise ProtocolError("connection ended mid-frame")
                    if self.state is State.OPEN:
                        raise ProtocolError("connection ended without a close frame")
                    if self.role is Role.INITIATOR and not self._received_any:
                        raise Refused("the server closed the connection before the handshake "
                                      "(busy, or refusing this address)")
                    raise ProtocolError("connection ended before the channel was established")
                return NEED_DATA
            header, body = frame
            if self.state is State.HANDSHAKE:
                self._on_handshake_message(body)
                continue
            event = self._on_frame(*self._decrypt(header, body))
            if event is not None:
                return event

    def _take_frame(self) -> tuple[bytes, bytes] | None:
        if len(self._received) < _HEADER_LENGTH:
            return None
        header = bytes(self._received[:_HEADER_LENGTH])
        length = int.from_bytes(header, "big")
        limit = self.max_frame_length if self.state is State.OPEN else _PREAUTH_FRAME_LIMIT
        # Checked before waiting for the body, so a huge length costs us nothing.
        if length > limit:
            if self.state is State.HANDSHAKE and self.role is Role.INITIATOR:
                # The server's first bytes are no handshake: another service on that port (sshd, a web server).
                began = bytes(self._received[:_FIRST_BYTES_SHOWN])
                raise ProtocolError(f"the other side does not speak Pydra's protocol (it began with {began!r})")
            raise ProtocolError(f"frame length {length} exceeds limit {limit}")
        end = _HEADER_LENGTH + length
        if len(self._received) < end:
            return None
        body = bytes(self._received[_HEADER_LENGTH:end])
        del self._received[:end]
        return header, body

    def _on_handshake_message(self, message: bytes) -> None:
        number = 1 if self.role is Role.RESPONDER else 2
        try:
            if self._handshake.read_message(message):
                raise HandshakeError(f"handshake message {number} has a payload, expected none")
            if self.role is Role.RESPONDER:
                self._outgoing += _frame(self._handshake.write_message())
        except DecryptError:
            raise HandshakeError(f"handshake message {number} failed to decrypt") from None
        except NoiseError as error:
            raise HandshakeError(f"handshake message {number} is invalid: {error}") from None
        self._send_cipher, self._receive_cipher = self._handshake.split()
        self.state = State.AUTHENTICATING
        if self.role is Role.RESPONDER:
            # The responder proves itself first, in the same flight as its handshake reply.
            self._queue(_FrameType.AUTH, self._identity_proof())

    def _decrypt(self, header: bytes, body: bytes) -> tuple[_FrameType, bytes]:
        # The length header is authenticated as associated data.
        number = self._receive_cipher.nonce
        try:
            plaintext = self._receive_cipher.decrypt_with_ad(header, body)
        except DecryptError:
            raise ProtocolError(f"frame {number} failed to decrypt") from None
        except NoiseError as error:
            raise ProtocolError(f"cannot receive: {error}") from None
        if not plaintext:
            raise ProtocolError(f"frame {number} is empty, expected a type byte")
        try:
            return _FrameType(plaintext[0]), plaintext[1:]
        except ValueError:
            raise ProtocolError(f"frame {number} has unknown type {plaintext[0]}") from None

    def _on_frame(self, kind: _FrameType, body: bytes) -> Event | None:
        expected = _EXPECTED_FRAMES[self.state]
        if kind not in expected:
            names = " or ".join(t.name.lower() for t in expected)
            raise ProtocolError(f"expected {names} frame, got {kind.name.lower()} frame")

        if kind is _FrameType.AUTH:
            return self._on_auth(body)
        if kind is _FrameType.ACCEPT:
            if body:
                raise ProtocolError("accept frame has a body, expected none")
            self.state = State.OPEN
            return Established(self._peer_key, self._authorization)
        if kind is _FrameType.DATA:
            return Data(body)
        # What is left is CLOSE.
        reason = _decode_reason(body)
        if self.state is State.AWAITING_ACCEPT:
            raise AuthenticationError(f"responder refused the channel: {reason}")
        self.state = State.CLOSED
        return Closed(reason)

    def _on_auth(self, body: bytes) -> Established | None:
        peer = self.role.peer.value
        expected_length = _KEY_LENGTH + _SIGNATURE_LENGTH
        if len(body) != expected_length:
            raise AuthenticationError(
                f"{peer} auth frame has {len(body)} bytes, expected {expected_length}"
            )
        key, signature = body[:_KEY_LENGTH], body[_KEY_LENGTH:]
        signed = _AUTH_LABELS[self.role.peer] + self._handshake.handshake_hash
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, signed)
        except (InvalidSignature, ValueError):
            raise AuthenticationError(f"{peer} signature does not verify") from None
        try:
            self._authorization = self._check_peer(key)
        except Exception as error:  # the callback's contract is "raise to reject"
            if self.role is Role.RESPONDER:
                # Tell a legitimate but unauthorized client why, inside the channel.
                self._queue(_FrameType.CLOSE, _REFUSAL.encode("utf-8"))
            raise AuthenticationError(f"{peer} identity rejected: {error}") from error
        self._peer_key = key

        if self.role is Role.INITIATOR:
            self._queue(_FrameType.AUTH, self._identity_proof())
            self.state = State.AWAITING_ACCEPT
            return None
        self._queue(_FrameType.ACCEPT, b"")
        self.state = State.OPEN
        return Established(self._peer_key, self._authorization)

    # -- sending -----------------------------------------------------------------------------

    def _identity_proof(self) -> bytes:
        signed = _AUTH_LABELS[self.role] + self._handshake.handshake_hash
        public_key = self._identity.public_key().public_bytes_raw()
        return public_key + self._identity.sign(signed)

    def _queue(self, kind: _FrameType, body: bytes) -> None:
        length = 1 + len(body) + TAGLEN
        if length > self.max_frame_length:
            raise UsageError(f"frame length {length} exceeds limit {self.max_frame_length}")
        header = length.to_bytes(_HEADER_LENGTH, "big")
        try:
            self._outgoing += header + self._send_cipher.encrypt_with_ad(
                header, bytes([kind]) + body
            )
        except NoiseError as error:
            raise ProtocolError(f"cannot send: {error}") from None

    def _fail(self, error: ChannelError) -> Failed:
        # Keep the first failure: it is the one that explains the rest.
        if not isinstance(self._terminal_event, Failed):
            self.state = State.ERROR
            self._terminal_event = Failed(error)
        return self._terminal_event


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(_HEADER_LENGTH, "big") + body


def _decode_reason(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not utf-8") from None


def encode_json(message: dict[str, Any]) -> bytes:
    """Serialise a JSON object for a `Data` event (strict JSON: no NaN or Infinity)."""
    if not isinstance(message, dict):
        raise TypeError(f"expected a dict, got {type(message).__name__}")
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_json(data: bytes) -> dict[str, Any]:
    """Parse the bytes of a `Data` event as a JSON object; raise `ProtocolError` otherwise."""
    try:
        message = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("data frame is not valid json") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"data frame holds a json {type(message).__name__}, expected an object")
    return message


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not json")
