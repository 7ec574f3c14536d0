"""The Noise Protocol Framework, revision 34, for the suite 25519 / ChaChaPoly / SHA256.

This module is sans-IO: it turns payloads into handshake and transport messages and back,
and never touches a socket.  Names follow the specification (https://noiseprotocol.org/noise.html)
so the two can be read side by side:

- `CipherState` encrypts and decrypts with one key and a 64-bit counter nonce (spec section 5.1);
- `SymmetricState` holds the chaining key and the handshake hash (section 5.2);
- `HandshakeState` runs a handshake pattern token by token (section 5.3).

Every non-PSK pattern of the specification is supported: the one-way patterns N, K, X, the
interactive patterns NN ... IX, and the deferred patterns NK1 ... I1X1 (section 18).

Typical use::

    hs = HandshakeState("NN", initiator=True, prologue=b"my app v1")
    wire.send(hs.write_message())
    hs.read_message(wire.recv())
    send, receive = hs.split()
    wire.send(send.encrypt_with_ad(b"", b"hello"))
"""

from __future__ import annotations

from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "DHLEN",
    "HASHLEN",
    "MAX_MESSAGE_LENGTH",
    "MAX_NONCE",
    "PATTERNS",
    "TAGLEN",
    "CipherState",
    "DecryptError",
    "HandshakeState",
    "NoiseError",
    "SymmetricState",
]

DHLEN = 32  #: length of an X25519 public key and of a DH output
HASHLEN = 32  #: length of a SHA-256 digest
TAGLEN = 16  #: length of a ChaCha20-Poly1305 authentication tag
MAX_NONCE = 2**64 - 1  #: reserved nonce value: a CipherState refuses to use it
MAX_MESSAGE_LENGTH = 65535  #: the spec's limit on the length of a handshake message

_SUITE = "25519_ChaChaPoly_SHA256"


class NoiseError(Exception):
    """A Noise operation failed; the state object that raised it must be discarded."""


class DecryptError(NoiseError):
    """A ciphertext failed authentication (wrong key, wrong associated data, or tampering)."""


# ---------------------------------------------------------------------------------------------
# Crypto functions of the suite (spec section 4)


def _hash(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def _hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> list[bytes]:
    """HKDF as section 4.3 defines it: HMAC-based, outputs chained with a counter byte."""
    temp_key = _hmac(chaining_key, input_key_material)
    outputs: list[bytes] = []
    previous = b""
    for counter in range(1, num_outputs + 1):
        previous = _hmac(temp_key, previous + bytes([counter]))
        outputs.append(previous)
    return outputs


def _dh(private_key: X25519PrivateKey, public_key: bytes) -> bytes:
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        # cryptography refuses low-order points, whose shared secret would be all zeros;
        # section 12.1 allows rejecting them, and doing so makes such keys a clean failure.
        raise NoiseError("invalid public key") from None


def _public_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


# ---------------------------------------------------------------------------------------------
# Section 5.1


class CipherState:
    """A ChaCha20-Poly1305 key and the 64-bit counter used as its nonce.

    Without a key, encryption and decryption pass data through unchanged (as the spec requires
    for the start of a handshake).  The counter never wraps: once it reaches 2**64-1, which the
    spec reserves, every further call raises `NoiseError`.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = None if key is None else ChaCha20Poly1305(key)
        self._nonce = 0

    @property
    def has_key(self) -> bool:
        """Whether a key is set."""
        return self._aead is not None

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use."""
        return self._nonce

    def set_nonce(self, nonce: int) -> None:
        """Set the counter (spec: SetNonce); only tests and out-of-order transports need it."""
        self._nonce = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt `plaintext` with associated data `ad` and advance the nonce."""
        if self._aead is None:
            return plaintext
        ciphertext = self._aead.encrypt(self._next_nonce(), plaintext, ad)
        self._nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt and authenticate `ciphertext`; raise `DecryptError` and keep the nonce if not."""
        if self._aead is None:
            return ciphertext
        try:
            plaintext = self._aead.decrypt(self._next_nonce(), ciphertext, ad)
        except InvalidTag:
            raise DecryptError(f"ciphertext with nonce {self._nonce} failed to decrypt") from None
        self._nonce += 1
        return plaintext

    def _next_nonce(self) -> bytes:
        if self._nonce >= MAX_NONCE:
            raise NoiseError("nonce 2**64-1 is reserved: this cipher state is exhausted")
        # ChaChaPoly nonce: 32 zero bits followed by the counter, little-endian (section 12.3).
        return b"\x00\x00\x00\x00" + self._nonce.to_bytes(8, "little")


# ---------------------------------------------------------------------------------------------
# Section 5.2


class SymmetricState:
    """The chaining key `ck`, the handshake hash `h`, and the current handshake cipher."""

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self._h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self._h = _hash(protocol_name)
        self._ck = self._h
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        """The running hash of everything sent and received so far (spec: GetHandshakeHash)."""
        return self._h

    @property
    def has_key(self) -> bool:
        """Whether payloads are encrypted yet (some DH has been mixed in)."""
        return self._cipher.has_key

    def mix_key(self, input_key_material: bytes) -> None:
        """Fold a DH output into the chaining key and start a new handshake cipher."""
        self._ck, temp_key = _hkdf(self._ck, input_key_material, 2)
        self._cipher = CipherState(temp_key)

    def mix_hash(self, data: bytes) -> None:
        """Fold `data` into the handshake hash."""
        self._h = _hash(self._h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with the handshake hash as associated data, then hash the ciphertext."""
        ciphertext = self._cipher.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with the handshake hash as associated data, then hash the ciphertext."""
        plaintext = self._cipher.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Derive the transport ciphers: (initiator to responder, responder to initiator)."""
        initiator_key, responder_key = _hkdf(self._ck, b"", 2)
        return CipherState(initiator_key), CipherState(responder_key)


# ---------------------------------------------------------------------------------------------
# Handshake patterns (sections 7.4, 7.5 and 18), written as in the spec.  Lines before "..."
# are pre-messages: keys the other side knows before the handshake starts.

_PATTERN_TEXT = """
N:   <- s | ... | -> e, es
K:   -> s | <- s | ... | -> e, es, ss
X:   <- s | ... | -> e, es, s, ss
NN:  -> e | <- e, ee
NK:  <- s | ... | -> e, es | <- e, ee
NX:  -> e | <- e, ee, s, es
XN:  -> e | <- e, ee | -> s, se
XK:  <- s | ... | -> e, es | <- e, ee | -> s, se
XX:  -> e | <- e, ee, s, es | -> s, se
KN:  -> s | ... | -> e | <- e, ee, se
KK:  -> s | <- s | ... | -> e, es, ss | <- e, ee, se
KX:  -> s | ... | -> e | <- e, ee, se, s, es
IN:  -> e, s | <- e, ee, se
IK:  <- s | ... | -> e, es, s, ss | <- e, ee, se
IX:  -> e, s | <- e, ee, se, s, es
NK1: <- s | ... | -> e | <- e, ee, es
NX1: -> e | <- e, ee, s | -> es
X1N: -> e | <- e, ee | -> s | <- se
X1K: <- s | ... | -> e, es | <- e, ee | -> s | <- se
XK1: <- s | ... | -> e | <- e, ee, es | -> s, se
X1K1: <- s | ... | -> e | <- e, ee, es | -> s | <- se
X1X: -> e | <- e, ee, s, es | -> s | <- se
XX1: -> e | <- e, ee, s | -> es, s, se
X1X1: -> e | <- e, ee, s | -> es, s | <- se
K1N: -> s | ... | -> e | <- e, ee | -> se
K1K: -> s | <- s | ... | -> e, es | <- e, ee | -> se
KK1: -> s | <- s | ... | -> e | <- e, ee, se, es
K1K1: -> s | <- s | ... | -> e | <- e, ee, es | -> se
K1X: -> s | ... | -> e | <- e, ee, s, es | -> se
KX1: -> s | ... | -> e | <- e, ee, se, s | -> es
K1X1: -> s | ... | -> e | <- e, ee, s | -> se, es
I1N: -> e, s | <- e, ee | -> se
I1K: <- s | ... | -> e, es, s | <- e, ee | -> se
IK1: <- s | ... | -> e, s | <- e, ee, se, es
I1K1: <- s | ... | -> e, s | <- e, ee, es | -> se
I1X: -> e, s | <- e, ee, s, es | -> se
IX1: -> e, s | <- e, ee, se, s | -> es
I1X1: -> e, s | <- e, ee, s | -> se, es
"""


class _Message(NamedTuple):
    from_initiator: bool
    tokens: tuple[str, ...]


class _Pattern(NamedTuple):
    pre_messages: tuple[_Message, ...]
    messages: tuple[_Message, ...]


def _parse_messages(text: str) -> tuple[_Message, ...]:
    """Parse "-> e, es | <- e, ee" into messages."""
    messages = []
    for part in filter(None, (part.strip() for part in text.split("|"))):
        arrow, _, tokens = part.partition(" ")
        messages.append(_Message(arrow == "->", tuple(t.strip() for t in tokens.split(","))))
    return tuple(messages)


def _parse_patterns(text: str) -> dict[str, _Pattern]:
    patterns = {}
    for line in text.strip().splitlines():
        name, _, body = line.partition(":")
        pre_messages, _, messages = body.rpartition("...")
        patterns[name] = _Pattern(_parse_messages(pre_messages), _parse_messages(messages))
    return patterns


_PATTERNS = _parse_patterns(_PATTERN_TEXT)
PATTERNS: frozenset[str] = frozenset(_PATTERNS)  #: names of the supported handshake patterns


# ---------------------------------------------------------------------------------------------
# Section 5.3


class HandshakeState:
    """One side of a Noise handshake, run one message at a time.

    `pattern` is a name from `PATTERNS` such as "NN" or "XX".  `s` is this side's static key
    pair and `rs` the peer's static public key; pass them when the pattern needs them (for
    instance the initiator of "NK" must know `rs` beforehand).  `e` presets the ephemeral key
    and exists only to reproduce test vectors; normally a fresh one is generated.

    Call `write_message` and `read_message` alternately, as the pattern dictates, until
    `finished` is true, then `split` to get the transport ciphers.  After a `NoiseError`
    the handshake cannot continue: start a new one.
    """

    def __init__(
        self,
        pattern: str,
        initiator: bool,
        prologue: bytes = b"",
        *,
        s: X25519PrivateKey | None = None,
        rs: bytes | None = None,
        e: X25519PrivateKey | None = None,
    ) -> None:
        if pattern not in _PATTERNS:
            raise ValueError(f"unsupported handshake pattern {pattern!r}")
        self.protocol_name = f"Noise_{pattern}_{_SUITE}"
        self.initiator = initiator
        self._pattern = _PATTERNS[pattern]
        self._s = s
        self._e = e
        self._rs = rs
        self._re: bytes | None = None
        self._next_message = 0
        self._check_keys(pattern)

        self._symmetric = SymmetricState(self.protocol_name.encode("ascii"))
        self._symmetric.mix_hash(prologue)
        # The table lists the initiator's pre-message first, the order the spec hashes them in.
        for message in self._pattern.pre_messages:
            ours = message.from_initiator == initiator
            self._symmetric.mix_hash(
                _public_bytes(self._local_key("s")) if ours else self._remote_key("s")
            )

    def _check_keys(self, pattern: str) -> None:
        ours = [
            m
            for m in self._pattern.pre_messages + self._pattern.messages
            if m.from_initiator == self.initiator
        ]
        if self._s is None and any("s" in m.tokens for m in ours):
            raise ValueError(f"pattern {pattern} needs this side's static key s")
        theirs = [m for m in self._pattern.pre_messages if m.from_initiator != self.initiator]
        if self._rs is None and theirs:
            raise ValueError(f"pattern {pattern} needs the peer's static public key rs")

    @property
    def finished(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._next_message == len(self._pattern.messages)

    @property
    def handshake_hash(self) -> bytes:
        """The handshake hash `h`; once finished, a unique name for this session."""
        return self._symmetric.handshake_hash

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, if known yet."""
        return self._rs

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message, carrying `payload`."""
        message = bytearray()
        for token in self._take_turn(writing=True):
            if token == "e":
                if self._e is None:
                    self._e = X25519PrivateKey.generate()
                public = _public_bytes(self._e)
                message += public
                self._symmetric.mix_hash(public)
            elif token == "s":
                message += self._symmetric.encrypt_and_hash(_public_bytes(self._local_key("s")))
            else:
                self._symmetric.mix_key(self._dh(token))
        message += self._symmetric.encrypt_and_hash(payload)
        if len(message) > MAX_MESSAGE_LENGTH:
            raise NoiseError(f"handshake message of {len(message)} bytes exceeds 65535")
        return bytes(message)

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message and return its payload."""
        if len(message) > MAX_MESSAGE_LENGTH:
            raise NoiseError(f"handshake message of {len(message)} bytes exceeds 65535")
        rest = message
        for token in self._take_turn(writing=False):
            if token == "e":
                self._re, rest = _take(rest, DHLEN)
                self._symmetric.mix_hash(self._re)
            elif token == "s":
                length = DHLEN + TAGLEN if self._symmetric.has_key else DHLEN
                encrypted_key, rest = _take(rest, length)
                self._rs = self._symmetric.decrypt_and_hash(encrypted_key)
            else:
                self._symmetric.mix_key(self._dh(token))
        return self._symmetric.decrypt_and_hash(rest)

    def split(self) -> tuple[CipherState, CipherState]:
        """Return this side's transport ciphers as (send, receive).

        Unlike the spec's Split, which returns (initiator to responder, responder to initiator),
        the pair is oriented for the caller.  In one-way patterns the responder only receives.
        """
        if not self.finished:
            raise NoiseError("handshake is not finished")
        to_responder, to_initiator = self._symmetric.split()
        if self.initiator:
            return to_responder, to_initiator
        return to_initiator, to_responder

    def _take_turn(self, writing: bool) -> tuple[str, ...]:
        if self.finished:
            raise NoiseError("handshake is already finished")
        message = self._pattern.messages[self._next_message]
        if (message.from_initiator == self.initiator) != writing:
            expected = "read" if writing else "write"
            raise NoiseError(f"expected to {expected} handshake message {self._next_message + 1}")
        self._next_message += 1
        return message.tokens

    def _dh(self, token: str) -> bytes:
        # A DH token names the initiator's key first: "es" is the initiator's ephemeral with
        # the responder's static, so the responder computes it as DH(s, re).
        local, remote = (token[0], token[1]) if self.initiator else (token[1], token[0])
        return _dh(self._local_key(local), self._remote_key(remote))

    def _local_key(self, token: str) -> X25519PrivateKey:
        key = self._e if token == "e" else self._s
        assert key is not None, "the pattern uses keys only once they exist (see _check_keys)"
        return key

    def _remote_key(self, token: str) -> bytes:
        key = self._re if token == "e" else self._rs
        assert key is not None, "the pattern uses keys only once they exist (see _check_keys)"
        return key


def _take(data: bytes, length: int) -> tuple[bytes, bytes]:
    if len(data) < length:
        raise NoiseError(f"handshake message too short: need {length} more bytes, got {len(data)}")
    return data[:length], data[length:]
