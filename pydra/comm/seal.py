"""Sealing Pydra's own messages between MPI ranks with a per-job key.

MPI's transport authenticates no one, and Pydra's messages are pickles: a
forged one would run code on the rank that unpickles it. So when a job has a
key (``PYDRA_JOB_KEY``, 64 hex digits, fresh per job: ``pydra launch`` and
``PYDRA_SEAL=1 pydra run -n N`` make one) every message is sealed with
ChaCha20-Poly1305 before it leaves a rank and opened before anything of it
is unpickled. A message that does not open is dropped and logged (logger
``pydra.seal``, on the rank's stderr).

* **Nonce** (12 bytes): the sender's ``COMM_WORLD`` rank (4 bytes, big-endian)
  and a per-process 64-bit counter that only increases (8 bytes). No two
  ranks share a rank number and no process reuses a counter, so a nonce never
  repeats under one key. The counter starts at the wall clock in nanoseconds
  rather than 0, so that even a key someone reuses for job after job (an
  exported ``PYDRA_JOB_KEY``) gets fresh nonces, the clock having moved on
  further than any job counts. Two jobs running *at once* under one key
  could still collide, and could replay each other's messages: a key is
  for one job.
* **Associated data**: sender's world rank, receiver's world rank
  (:data:`ALL` for a collective that reaches every member), the counter, and
  the message's kind: its MPI tag, or a label naming the collective
  (``"bcast-spec"``, ``"shuffle"``...). So a message cannot be redirected to
  another rank or passed off as another kind.
* **Wire form**: the counter (8 bytes), then ciphertext and Poly1305 tag.
* **Parts**: a message's out-of-band buffers (:mod:`pydra.comm.mpi`) are
  sealed one by one (:meth:`Sealer.seal_part`), each under a counter of its
  own and the kind ``"tag N part"``, and go on the wire as ciphertext and
  Poly1305 tag only (so each opens into a buffer of its own, aligned). Their
  sizes and counters travel in the message's first MPI message, sealed as
  above, which binds them to it: a part opens only as the part that
  message names, so parts cannot be replayed, swapped or moved to another
  message.
* **Replays**: per (sender, tag or label) the receiver keeps the highest
  counter it opened and accepts only a greater one. MPI delivers messages
  from one sender with one tag on one communicator in the order they were
  sent (senders on several threads take a per-tag lock, see
  :mod:`pydra.comm.mpi`), so a genuine message is never refused.

Without a key the process gets :data:`PLAIN`, whose ``seal`` and ``open``
hand the bytes through; :mod:`pydra.comm.mpi` does not even call it then.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import sys
import time
from typing import Union

from pydra.config import setting
from pydra.errors import SealConfigError  # there so that pydra.cli catches it without loading this module

#: the receiver of a collective that reaches every member (a broadcast)
ALL = 0xFFFFFFFF
KEY_BYTES = 32
#: bytes a sealed part is longer than its payload: the Poly1305 tag
TAG_BYTES = 16
#: bytes a sealed message is longer than its payload: the counter and the Poly1305 tag
OVERHEAD = 8 + TAG_BYTES

_COUNTER = struct.Struct(">Q")
_HEADER = struct.Struct(">IIQ")  # sender, receiver, counter: the fixed part of the associated data
# From this size on, sealing encrypts into a buffer made for the wire; below, concatenating is quicker.
_INTO_BYTES = 1 << 16

KEY_HINT = "export PYDRA_JOB_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')"


class SealError(Exception):
    """A message that does not open (forged, altered, replayed, for another rank or tag): drop it."""


class Sealer:
    """Seals and opens this process's messages under one job key (see the module docstring)."""

    enabled = True

    def __init__(self, key: bytes, rank: int, first_counter: int | None = None) -> None:
        # Imported here: a process without a key never loads the cryptography package.
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if len(key) != KEY_BYTES:
            raise ValueError(f"a job key is {KEY_BYTES} bytes, not {len(key)}")
        self.rank = rank
        self._aead = ChaCha20Poly1305(key)
        self._encrypt_into = getattr(self._aead, "encrypt_into", None)
        self._decrypt_into = getattr(self._aead, "decrypt_into", None)
        self._rank_bytes = rank.to_bytes(4, "big")
        # next() on itertools.count is atomic under the GIL: threads never share a counter value.
        self._counter = itertools.count(time.time_ns() if first_counter is None else first_counter)
        self._seen: dict[tuple[int, int | str], int] = {}
        self._labels: dict[int | str, bytes] = {}

    def seal(self, payload: bytes | bytearray | memoryview, dest: int, tag: int | str) -> bytes | bytearray:
        """*payload* sealed for world rank *dest* (or :data:`ALL`) as a message of kind *tag*."""
        counter = next(self._counter)
        prefix = _COUNTER.pack(counter)
        nonce, aad = self._rank_bytes + prefix, _HEADER.pack(self.rank, dest, counter) + self._label(tag)
        if len(payload) < _INTO_BYTES or self._encrypt_into is None:  # (None: cryptography < 45)
            return prefix + self._aead.encrypt(nonce, payload, aad)
        # Straight into the wire buffer: for a large payload, concatenating a fresh copy costs
        # more than the encryption itself (its new pages fault in).
        sealed = bytearray(len(payload) + OVERHEAD)
        sealed[:8] = prefix
        self._encrypt_into(nonce, payload, aad, memoryview(sealed)[8:])
        return sealed

    def open(self, data: bytes | bytearray | memoryview, source: int, tag: int | str, dest: int | None = None) -> bytes:
        """The payload of *data*, received from world rank *source* as kind *tag*; raises :class:`SealError`.

        *dest* is the receiver the sender named: this rank unless it is a
        broadcast (:data:`ALL`).
        """
        if len(data) < OVERHEAD:
            raise SealError(f"{len(data)} bytes, too short to be sealed")
        view = memoryview(data)
        prefix = bytes(view[:8])
        (counter,) = _COUNTER.unpack(prefix)
        stream = (source, tag)
        # Checked before decrypting (cheap), recorded only once the message opens: a forgery
        # cannot raise the bar for genuine messages.
        if counter <= self._seen.get(stream, -1):
            raise SealError("replayed: its counter is not above the last one opened from that rank and tag")
        aad = _HEADER.pack(source, self.rank if dest is None else dest, counter) + self._label(tag)
        try:
            payload = self._aead.decrypt(source.to_bytes(4, "big") + prefix, view[8:], aad)
        except Exception:  # InvalidTag; also a source out of range
            raise SealError("does not authenticate: forged, altered, or sent to another rank or with another tag") from None
        self._seen[stream] = counter
        return payload

    def seal_part(self, payload: memoryview, dest: int, tag: int, out: memoryview) -> int:
        """Seal *payload*, an out-of-band part of a message of kind *tag* for world rank *dest*, into *out*.

        *out* holds ``len(payload) + TAG_BYTES`` bytes. Returns the counter
        it was sealed under, for the message's first MPI message to name.
        """
        counter = next(self._counter)
        nonce, aad = self._rank_bytes + _COUNTER.pack(counter), self._part_aad(self.rank, dest, counter, tag)
        if self._encrypt_into is None:  # cryptography < 45
            out[:] = self._aead.encrypt(nonce, payload, aad)
        else:
            self._encrypt_into(nonce, payload, aad, out)
        return counter

    def open_part(self, data: memoryview, source: int, tag: int, counter: int, out: memoryview) -> None:
        """Open *data*, the part sealed under *counter* of a message of kind *tag* from world rank *source*, into *out*.

        The counter comes from the message's first MPI message, opened
        already (so replays were refused there). Raises :class:`SealError`.
        """
        try:
            nonce = source.to_bytes(4, "big") + _COUNTER.pack(counter)
            aad = self._part_aad(source, self.rank, counter, tag)
            if self._decrypt_into is None:  # cryptography < 45
                out[:] = self._aead.decrypt(nonce, data, aad)
            else:
                self._decrypt_into(nonce, data, aad, out)
        except Exception:  # InvalidTag; also a source out of range
            raise SealError("a part does not authenticate: forged, altered, or not the part its message names") \
                from None

    def _part_aad(self, source: int, dest: int, counter: int, tag: int) -> bytes:
        return _HEADER.pack(source, dest, counter) + self._label(tag) + b" part"

    def _label(self, tag: int | str) -> bytes:
        label = self._labels.get(tag)
        if label is None:
            # Tags and collective labels live in separate name spaces: "tag 12" vs "collective shuffle".
            label = self._labels[tag] = (f"tag {tag}" if isinstance(tag, int) else f"collective {tag}").encode()
        return label


class PlainSealer:
    """Sealing off: the bytes go through as they are."""

    enabled = False

    def seal(self, payload: bytes | bytearray | memoryview, dest: int, tag: int | str) -> bytes | bytearray | memoryview:
        """*payload* unchanged."""
        return payload

    def open(self, data: bytes | bytearray | memoryview, source: int, tag: int | str, dest: int | None = None) -> bytes | bytearray | memoryview:
        """*data* unchanged."""
        return data


AnySealer = Union[Sealer, PlainSealer]
PLAIN = PlainSealer()

_process: AnySealer | None = None


def parse_key(text: str) -> bytes:
    """The 32 bytes of a ``PYDRA_JOB_KEY`` value; raises :class:`SealConfigError`."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise SealConfigError(f"PYDRA_JOB_KEY must be {2 * KEY_BYTES} hex digits ({KEY_BYTES} random bytes), e.g. {KEY_HINT}")
    return key


def start(rank: int) -> AnySealer:
    """This process's sealer, made on the first call from ``PYDRA_JOB_KEY`` (then removed from the environment).

    *rank* is this process's ``COMM_WORLD`` rank. Raises
    :class:`SealConfigError` if ``PYDRA_SEAL=1`` asks for sealing without a key,
    or the key is malformed. Later calls return the same sealer.
    """
    global _process
    if _process is not None:
        return _process
    text = setting("JOB_KEY")
    # Read once, then gone: task code and the processes it starts do not inherit it.
    os.environ.pop("PYDRA_JOB_KEY", None)
    if text:
        _process = Sealer(parse_key(text), rank)
        _install_log_handler()
    elif setting("SEAL"):
        raise SealConfigError(f"PYDRA_SEAL=1 needs PYDRA_JOB_KEY, the same on every rank: {KEY_HINT}")
    else:
        _process = PLAIN
    return _process


def current() -> AnySealer:
    """The sealer this process started with (:data:`PLAIN` before :func:`start`, or without a key)."""
    return _process if _process is not None else PLAIN


# -- dropped messages ---------------------------------------------------------------------------

log = logging.getLogger("pydra.seal")

#: at most this many drops are logged line by line per window; the rest are counted
LOG_BURST = 20
LOG_WINDOW = 10.0


def _install_log_handler() -> None:
    # A dropped message is a security event: it goes to this rank's stderr whatever task code
    # does with logging, and is not forwarded to rank 0 like a task's records.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pydra: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


class _DropReporter:
    """Logs each dropped message, but no more than :data:`LOG_BURST` per :data:`LOG_WINDOW` seconds."""

    def __init__(self) -> None:
        self.window_start = -LOG_WINDOW
        self.logged = 0
        self.unlogged = 0

    def __call__(self, rank: int, source: int, kind: str, error: SealError) -> None:
        now = time.monotonic()
        if now - self.window_start >= LOG_WINDOW:
            self.window_start, self.logged = now, 0
        if self.logged >= LOG_BURST:
            self.unlogged += 1
            return
        self.logged += 1
        since = f" ({self.unlogged} more were dropped since the last line)" if self.unlogged else ""
        self.unlogged = 0
        log.warning("rank %d dropped a message from rank %d, %s: %s; it was not unpickled%s", rank, source, kind, error, since)


_reporter = _DropReporter()


def report_dropped(rank: int, source: int, kind: str, error: SealError) -> None:
    """Log that world rank *rank* dropped a message of *kind* from world rank *source* (rate-limited)."""
    _reporter(rank, source, kind, error)
