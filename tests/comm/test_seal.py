"""The sealer (pydra/comm/seal.py), in process: what opens and what is refused.

Proves: a sealed message opens for the rank, tag and sender it was sealed
for, whatever the payload type; a flipped bit anywhere, a wrong source, a
wrong tag or label, a wrong receiver, a replayed or stale counter, and a
message sealed under another key are all refused with SealError, and a
refused message does not move the replay bar; nonces never repeat, also from
several threads; without a key, the plain sealer passes bytes through; the
key is read from PYDRA_JOB_KEY once and removed from the environment;
PYDRA_SEAL=1 without a key, or a malformed key, is a one-line SealConfigError;
dropped messages are logged with their source rank and kind, rate-limited.
No MPI is involved: the end-to-end tests are tests/core/test_sealing.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading

import pytest

from pydra.comm import seal
from pydra.comm.seal import ALL, OVERHEAD, PLAIN, SealConfigError, SealError, Sealer

KEY = bytes(range(32))
REPLIES, LOG = 12, 16


def pair(key: bytes = KEY) -> tuple[Sealer, Sealer]:
    """A worker (world rank 1) and rank 0, sharing *key*."""
    return Sealer(key, 1), Sealer(key, 0)


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 4000, bytearray(b"commands"), memoryview(b"view")])
def test_round_trip(payload) -> None:
    worker, master = pair()
    sealed = worker.seal(payload, 0, REPLIES)
    assert len(sealed) == len(payload) + OVERHEAD
    assert bytes(payload) not in sealed or len(payload) < 2  # encrypted, not merely signed
    assert master.open(sealed, 1, REPLIES) == bytes(payload)
    assert master.open(bytearray(worker.seal(payload, 0, REPLIES)), 1, REPLIES) == bytes(payload)


def test_collective_labels_and_broadcasts() -> None:
    root, member = Sealer(KEY, 0), Sealer(KEY, 2)
    sealed = root.seal(b"spec", ALL, "bcast-spec")
    assert member.open(sealed, 0, "bcast-spec", dest=ALL) == b"spec"
    with pytest.raises(SealError):  # a broadcast is not a message addressed to this rank
        Sealer(KEY, 2).open(sealed, 0, "bcast-spec")
    with pytest.raises(SealError):  # nor another collective
        Sealer(KEY, 2).open(sealed, 0, "shuffle", dest=ALL)
    with pytest.raises(SealError):  # tags and labels do not mix: tag 12 is not the label "12"
        Sealer(KEY, 0).open(Sealer(KEY, 1).seal(b"x", 0, REPLIES), 1, "12")


@pytest.mark.parametrize("position", [0, 7, 8, 20, -17, -1])
def test_a_flipped_bit_is_refused(position: int) -> None:
    worker, master = pair()
    sealed = bytearray(worker.seal(b"a reply worth forging" * 3, 0, REPLIES))
    sealed[position] ^= 0x10
    with pytest.raises(SealError):
        master.open(sealed, 1, REPLIES)


def test_wrong_source_tag_or_receiver_is_refused() -> None:
    worker, master = pair()
    sealed = worker.seal(b"payload", 0, REPLIES)
    with pytest.raises(SealError, match="authenticate"):
        master.open(sealed, 2, REPLIES)  # MPI says it came from rank 2: not what rank 1 sealed
    with pytest.raises(SealError, match="authenticate"):
        master.open(sealed, 1, LOG)  # passed off as another kind of message
    with pytest.raises(SealError, match="authenticate"):
        Sealer(KEY, 2).open(sealed, 1, REPLIES)  # redirected to another rank
    assert master.open(sealed, 1, REPLIES) == b"payload"  # the refusals did not spoil it


def test_replays_and_stale_counters_are_refused() -> None:
    worker, master = pair()
    first, second = worker.seal(b"one", 0, REPLIES), worker.seal(b"two", 0, REPLIES)
    assert master.open(second, 1, REPLIES) == b"two"
    with pytest.raises(SealError, match="replayed"):
        master.open(second, 1, REPLIES)
    with pytest.raises(SealError, match="replayed"):
        master.open(first, 1, REPLIES)  # older than one already opened
    # The bar is per (source, tag): another tag from the same rank has its own.
    assert master.open(worker.seal(b"log", 0, LOG), 1, LOG) == b"log"


def test_a_forgery_does_not_move_the_replay_bar() -> None:
    worker, master = pair()
    genuine = worker.seal(b"genuine", 0, REPLIES)
    forged = bytearray((2**64 - 1).to_bytes(8, "big")) + bytearray(32)  # the highest counter, junk after
    with pytest.raises(SealError):
        master.open(forged, 1, REPLIES)
    assert master.open(genuine, 1, REPLIES) == b"genuine"


def test_another_key_is_refused() -> None:
    sealed = Sealer(secrets.token_bytes(32), 1).seal(b"payload", 0, REPLIES)
    with pytest.raises(SealError, match="authenticate"):
        Sealer(KEY, 0).open(sealed, 1, REPLIES)


def test_short_and_raw_messages_are_refused() -> None:
    import pickle

    master = Sealer(KEY, 0)
    for data in (b"", b"x" * (OVERHEAD - 1), pickle.dumps([(1, True, b"", 0.0)], 5)):
        with pytest.raises(SealError):
            master.open(data, 1, REPLIES)


def test_nonces_never_repeat() -> None:
    sealer = Sealer(KEY, 3)
    counters = [int.from_bytes(sealer.seal(b"", 0, tag)[:8], "big") for tag in (REPLIES, LOG, "shuffle") * 100]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    # From several threads at once (a worker's heartbeat thread, task threads logging).
    seen: list[int] = []

    def seal_many() -> None:
        seen.extend(int.from_bytes(sealer.seal(b"", 0, LOG)[:8], "big") for _ in range(2000))

    threads = [threading.Thread(target=seal_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == len(seen) == 8000
    assert min(seen) > max(counters)


def test_counters_start_at_the_clock() -> None:
    # So that a key reused for job after job still never repeats a (rank, counter) nonce.
    import time

    before = time.time_ns()
    counter = int.from_bytes(Sealer(KEY, 0).seal(b"", 1, REPLIES)[:8], "big")
    assert before <= counter <= time.time_ns()


def test_plain_sealer_passes_bytes_through() -> None:
    payload = bytearray(b"unsealed")
    assert PLAIN.enabled is False
    assert PLAIN.seal(payload, 0, REPLIES) is payload
    assert PLAIN.open(payload, 1, REPLIES) is payload


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch):
    """A process that has not started sealing yet (seal.start is once per process)."""
    monkeypatch.setattr(seal, "_process", None)
    monkeypatch.delenv("PYDRA_JOB_KEY", raising=False)
    monkeypatch.delenv("PYDRA_SEAL", raising=False)
    return monkeypatch


def test_no_key_means_plaintext(fresh_process) -> None:
    assert seal.current() is PLAIN
    assert seal.start(0) is PLAIN
    assert seal.current() is PLAIN


def test_the_key_is_read_once_and_removed(fresh_process) -> None:
    key = secrets.token_hex(32)
    fresh_process.setenv("PYDRA_JOB_KEY", key)
    sealer = seal.start(1)
    assert isinstance(sealer, Sealer) and sealer.rank == 1
    assert "PYDRA_JOB_KEY" not in os.environ  # task code and its children do not inherit it
    assert seal.current() is sealer and seal.start(1) is sealer
    assert Sealer(bytes.fromhex(key), 0).open(sealer.seal(b"hi", 0, REPLIES), 1, REPLIES) == b"hi"


def test_seal_without_a_key_is_a_one_line_error(fresh_process) -> None:
    fresh_process.setenv("PYDRA_SEAL", "1")
    with pytest.raises(SealConfigError) as caught:
        seal.start(0)
    message = str(caught.value)
    assert "\n" not in message
    assert "PYDRA_SEAL=1 needs PYDRA_JOB_KEY" in message and "token_hex(32)" in message


@pytest.mark.parametrize("bad", ["abc", "zz" * 32, "00" * 31, "00" * 33])
def test_a_malformed_key_is_refused(fresh_process, bad: str) -> None:
    fresh_process.setenv("PYDRA_JOB_KEY", bad)
    with pytest.raises(SealConfigError, match="64 hex digits"):
        seal.start(0)


def test_dropped_messages_are_logged_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    seal.log.addHandler(handler)
    monkeypatch.setattr(seal, "_reporter", seal._DropReporter())
    try:
        for _ in range(seal.LOG_BURST + 5):
            seal.report_dropped(0, 2, "tag 12 (replies)", SealError("replayed"))
        assert len(records) == seal.LOG_BURST
        assert records[0] == "rank 0 dropped a message from rank 2, tag 12 (replies): replayed; it was not unpickled"
        seal._reporter.window_start -= seal.LOG_WINDOW  # the next window
        seal.report_dropped(0, 1, "collective shuffle", SealError("does not authenticate"))
        assert records[-1].endswith("(5 more were dropped since the last line)")
        assert "from rank 1, collective shuffle" in records[-1]
    finally:
        seal.log.removeHandler(handler)


def test_large_payloads_seal_the_same_either_way() -> None:
    # Above 64 KiB the sealer encrypts straight into the wire buffer (cryptography >= 45).
    payload = bytes(range(256)) * 1024
    a, b = Sealer(KEY, 1, first_counter=5), Sealer(KEY, 1, first_counter=5)
    b._encrypt_into = None
    assert bytes(a.seal(payload, 0, REPLIES)) == b.seal(payload, 0, REPLIES)
