"""The SSH wire encoding (RFC 4251, section 5): what key files and the ssh-agent protocol are made of."""

from __future__ import annotations

import struct

__all__ = ["WireReader", "ssh_string", "uint32"]


def uint32(value: int) -> bytes:
    """A big-endian 32-bit unsigned integer."""
    return struct.pack(">I", value)


def ssh_string(data: bytes) -> bytes:
    """*data* preceded by its length as a :func:`uint32`."""
    return uint32(len(data)) + data


class WireReader:
    """Reads bytes, big-endian uint32s and length-prefixed strings; ValueError when short."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def _take(self, length: int) -> bytes:
        end = self._position + length
        if end > len(self._data):
            raise ValueError("the data is truncated")
        chunk = self._data[self._position : end]
        self._position = end
        return chunk

    def byte(self) -> int:
        """One byte, as an integer."""
        return self._take(1)[0]

    def uint32(self) -> int:
        """A big-endian 32-bit unsigned integer."""
        return struct.unpack(">I", self._take(4))[0]

    def string(self) -> bytes:
        """A length-prefixed string."""
        return self._take(self.uint32())

    def rest(self) -> bytes:
        """Everything not yet read."""
        return self._take(len(self._data) - self._position)

    def expect_end(self) -> None:
        """Raise ValueError if anything is left unread."""
        if self._position != len(self._data):
            raise ValueError("unexpected bytes after the data")
