"""Tests for pydra.comm.noise: the published test vectors, then the spec's edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from pydra.comm.noise import (
    MAX_NONCE,
    PATTERNS,
    CipherState,
    DecryptError,
    HandshakeState,
    NoiseError,
)

# Public-domain vectors from cacophony, copied from ../shared/vectors so the repo runs alone.
VECTORS = json.loads((Path(__file__).parents[1] / "data" / "noise-vectors.json").read_text())[
    "vectors"
]
ONE_WAY = {"N", "K", "X"}


def _pattern(protocol_name: str) -> str:
    return protocol_name.split("_")[1]


def _side(vector: dict, prefix: str, initiator: bool) -> HandshakeState:
    def private(name: str) -> X25519PrivateKey | None:
        value = vector.get(f"{prefix}_{name}")
        return None if value is None else X25519PrivateKey.from_private_bytes(bytes.fromhex(value))

    remote_static = vector.get(f"{prefix}_remote_static")
    return HandshakeState(
        _pattern(vector["protocol_name"]),
        initiator,
        bytes.fromhex(vector[f"{prefix}_prologue"]),
        s=private("static"),
        e=private("ephemeral"),
        rs=None if remote_static is None else bytes.fromhex(remote_static),
    )


def test_every_supported_pattern_has_a_vector():
    assert {_pattern(vector["protocol_name"]) for vector in VECTORS} == PATTERNS


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["protocol_name"] for vector in VECTORS])
def test_vector(vector):
    initiator = _side(vector, "init", initiator=True)
    responder = _side(vector, "resp", initiator=False)
    assert initiator.protocol_name == vector["protocol_name"]

    messages = [
        (bytes.fromhex(message["payload"]), bytes.fromhex(message["ciphertext"]))
        for message in vector["messages"]
    ]
    one_way = _pattern(vector["protocol_name"]) in ONE_WAY
    transport = None
    # Messages alternate by index, the initiator first, through the handshake and the
    # transport messages after it; in one-way patterns only the initiator sends.
    for index, (payload, ciphertext) in enumerate(messages):
        forwards = one_way or index % 2 == 0
        if transport is None:
            writer, reader = (initiator, responder) if forwards else (responder, initiator)
            assert writer.write_message(payload) == ciphertext
            assert reader.read_message(ciphertext) == payload
            if initiator.finished:
                assert responder.finished
                assert initiator.handshake_hash.hex() == vector["handshake_hash"]
                assert responder.handshake_hash.hex() == vector["handshake_hash"]
                transport = initiator.split(), responder.split()
        else:
            (initiator_send, initiator_receive), (responder_send, responder_receive) = transport
            send, receive = (
                (initiator_send, responder_receive)
                if forwards
                else (responder_send, initiator_receive)
            )
            assert send.encrypt_with_ad(b"", payload) == ciphertext
            assert receive.decrypt_with_ad(b"", ciphertext) == payload
    assert transport is not None, "the vector ends before the handshake does"


def _static_letters(pattern: str) -> tuple[str, str]:
    """What the name says of each side's static key: N none, K known, X or I transmitted."""
    letters = pattern.replace("1", "")
    if len(letters) == 1:  # one-way: the letter is the sender's; the recipient's is known
        letters += "K"
    return letters[0], letters[1]


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(sorted(PATTERNS)),
    payloads=st.lists(st.binary(max_size=100), min_size=4, max_size=4),
)
def test_fresh_keys_agree_for_every_pattern(pattern, payloads):
    initiator_letter, responder_letter = _static_letters(pattern)
    initiator_static = X25519PrivateKey.generate()
    responder_static = X25519PrivateKey.generate()
    initiator_public = initiator_static.public_key().public_bytes_raw()
    responder_public = responder_static.public_key().public_bytes_raw()
    initiator = HandshakeState(
        pattern,
        True,
        b"prologue",
        s=None if initiator_letter == "N" else initiator_static,
        rs=responder_public if responder_letter == "K" else None,
    )
    responder = HandshakeState(
        pattern,
        False,
        b"prologue",
        s=None if responder_letter == "N" else responder_static,
        rs=initiator_public if initiator_letter == "K" else None,
    )

    writer, reader = initiator, responder
    for payload in payloads:
        if initiator.finished:
            break
        assert reader.read_message(writer.write_message(payload)) == payload
        writer, reader = reader, writer
    assert initiator.finished and responder.finished
    assert initiator.handshake_hash == responder.handshake_hash
    assert initiator.remote_static == (None if responder_letter == "N" else responder_public)
    assert responder.remote_static == (None if initiator_letter == "N" else initiator_public)

    initiator_send, initiator_receive = initiator.split()
    responder_send, responder_receive = responder.split()
    for payload in payloads:
        assert (
            responder_receive.decrypt_with_ad(b"", initiator_send.encrypt_with_ad(b"", payload))
            == payload
        )
        if pattern not in ONE_WAY:
            assert (
                initiator_receive.decrypt_with_ad(b"", responder_send.encrypt_with_ad(b"", payload))
                == payload
            )


def test_nonce_2_64_minus_1_is_reserved():
    sender, receiver = CipherState(bytes(32)), CipherState(bytes(32))
    sender.set_nonce(MAX_NONCE - 1)
    receiver.set_nonce(MAX_NONCE - 1)
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"last")) == b"last"
    assert sender.nonce == receiver.nonce == MAX_NONCE

    with pytest.raises(NoiseError, match="reserved"):
        sender.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NoiseError, match="reserved"):
        receiver.decrypt_with_ad(b"", bytes(32))
    assert sender.nonce == MAX_NONCE  # no wrap to 0


def test_failed_decryption_does_not_advance_the_nonce():
    sender, receiver = CipherState(bytes(32)), CipherState(bytes(32))
    ciphertext = sender.encrypt_with_ad(b"ad", b"payload")
    with pytest.raises(DecryptError, match="nonce 0 failed to decrypt"):
        receiver.decrypt_with_ad(b"other ad", ciphertext)
    assert receiver.nonce == 0
    assert receiver.decrypt_with_ad(b"ad", ciphertext) == b"payload"


def test_cipher_without_key_passes_data_through():
    cipher = CipherState()
    assert not cipher.has_key
    assert cipher.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.decrypt_with_ad(b"ad", b"plain") == b"plain"


def test_messages_must_follow_the_pattern():
    initiator = HandshakeState("NN", True)
    with pytest.raises(NoiseError, match="expected to write handshake message 1"):
        initiator.read_message(bytes(32))
    with pytest.raises(NoiseError, match="not finished"):
        initiator.split()

    responder = HandshakeState("NN", False)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    with pytest.raises(NoiseError, match="already finished"):
        initiator.write_message()


@pytest.mark.parametrize(
    ("pattern", "initiator", "keys", "message"),
    [
        ("NNpsk0", True, {}, "unsupported handshake pattern 'NNpsk0'"),
        ("XX", True, {}, "needs this side's static key s"),
        ("NK", True, {}, "needs the peer's static public key rs"),
        ("NK", False, {}, "needs this side's static key s"),
    ],
)
def test_missing_keys_and_unknown_patterns_are_refused(pattern, initiator, keys, message):
    with pytest.raises(ValueError, match=message):
        HandshakeState(pattern, initiator, **keys)


def test_low_order_public_key_is_rejected():
    responder = HandshakeState("NN", False)
    responder.read_message(bytes(32))  # an all-zero point: every DH with it gives zeros
    with pytest.raises(NoiseError, match="invalid public key"):
        responder.write_message()


def test_short_and_long_messages_are_rejected():
    with pytest.raises(NoiseError, match="too short"):
        HandshakeState("NN", False).read_message(bytes(31))
    with pytest.raises(NoiseError, match="exceeds 65535"):
        HandshakeState("NN", False).read_message(bytes(65536))
    with pytest.raises(NoiseError, match="exceeds 65535"):
        HandshakeState("NN", True).write_message(bytes(65535 - 31))


def test_tampered_handshake_message_fails_to_decrypt():
    initiator, responder = HandshakeState("NN", True), HandshakeState("NN", False)
    responder.read_message(initiator.write_message())
    reply = bytearray(responder.write_message(b"secret"))
    reply[-1] ^= 1
    with pytest.raises(DecryptError):
        initiator.read_message(bytes(reply))
