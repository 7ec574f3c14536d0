"""What the channel tests share: three keys, a pinned host key, and a recording authorizer."""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CLIENT_KEY = Ed25519PrivateKey.generate()
SERVER_KEY = Ed25519PrivateKey.generate()
MALLORY_KEY = Ed25519PrivateKey.generate()


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def pin(expected: Ed25519PrivateKey) -> Callable[[bytes], None]:
    """A verify_server that knows one host key, like a known_hosts line."""

    def verify(key: bytes) -> None:
        if key != raw(expected):
            raise PermissionError("unknown host key")

    return verify


class Authorizer:
    """An authorize_client that accepts one key as user "alice" and records every call."""

    def __init__(self, allowed: Ed25519PrivateKey = CLIENT_KEY) -> None:
        self.allowed = raw(allowed)
        self.calls: list[bytes] = []
        self.addresses: list[str] = []  # only serve_channel passes the client's address

    def __call__(self, key: bytes, *address: str) -> str:
        self.calls.append(key)
        self.addresses += address
        if key != self.allowed:
            raise PermissionError("not in authorized_keys")
        return "alice"
