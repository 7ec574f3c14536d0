"""pydra.comm.shm without MPI: the arena's slots, and messages framed and unframed within one process.

The process maps its own arena as if it were a peer's ("rank 1", through
/proc/self/fd like any peer), so a message framed for rank 1 is unframed
here from rank 1, and the offsets freed here ride on the next message to
rank 1 back into the same arena.
"""

from __future__ import annotations

import gc
import os
import pickle
import random

import numpy as np
import pytest

from pydra.comm import serial, shm

PEER = 1


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch):
    """A fresh sharing state: an arena of 4 MiB, mapped again as rank 1's."""
    for name, value in [("_arena", None), ("_mapped", {}), ("_freed", {}), ("_holders", {}),
                        ("_counts", {"shared": 0, "by_mpi": 0})]:
        monkeypatch.setattr(shm, name, value)
    mine = shm.offer(4 << 20)
    assert shm.accept(mine + mine, [0, PEER], 0)  # member 1's record is this process's own
    yield shm._arena
    shm.stop()


def send(value: object) -> list:
    """*value* framed for the peer: its messages (the first, then any part by MPI)."""
    payload, buffers = serial.dumps_oob(value)
    messages = shm.frame(payload, buffers, PEER)
    assert messages is not None
    return messages


def receive(messages: list) -> object:
    """*messages* taken back from the peer; a part that went by MPI is handed over as it is."""
    payload, entries = shm.unframe(messages[0], PEER)
    by_mpi = iter(messages[1:])
    return serial.loads(payload, buffers=[next(by_mpi) if type(entry) is int else entry for entry in entries])


def test_slot_sizes_are_few_and_waste_at_most_a_third() -> None:
    sizes = {shm.slot_size(n) for n in range(1, 1 << 20, 997)}
    assert len(sizes) < 40
    for n in [1, 64, 65, 100, 129, 192, 193, 1 << 16, (1 << 20) - 1, 1 << 20, 3 << 19, (3 << 19) + 1]:
        size = shm.slot_size(n)
        assert size >= n and size % 64 == 0 and (n < 128 or size <= n * 3 / 2), n


def test_the_arena_gives_out_slots_until_full_and_takes_them_back_in_any_order(shared: shm.Arena) -> None:
    block = memoryview(bytes(range(256)) * 4096)  # 1 MiB
    starts = [shared.place(block) for _ in range(4)]
    assert sorted(starts) == [0, 1 << 20, 2 << 20, 3 << 20]
    assert shared.place(memoryview(b"x" * 64)) == shm.BY_MPI
    assert shared.statistics() == {"bytes_held": 4 << 20, "slots_held": 4}
    random.Random(5).shuffle(starts)
    shared.release(starts + [12345, starts[0]])  # an offset never given out, and one twice, are ignored
    assert shared.statistics() == {"bytes_held": 0, "slots_held": 0}
    assert shared.place(memoryview(bytes(4 << 20))) == 0  # the free runs joined into one again


def test_an_array_goes_through_a_slot_and_the_sender_may_change_its_own_at_once(shared: shm.Arena) -> None:
    original = np.arange(1 << 17, dtype=np.float64).reshape(256, 512)
    messages = send(original)
    assert len(messages) == 1  # nothing by MPI
    original[:] = -1  # the message holds a copy
    arrived = receive(messages)
    assert np.array_equal(arrived, np.arange(1 << 17, dtype=np.float64).reshape(256, 512))
    assert arrived.flags.writeable
    assert shm.statistics()["shared"] == 1


def test_a_slot_goes_back_only_when_no_view_of_it_lives(shared: shm.Arena) -> None:
    arrived = receive(send(np.arange(1 << 16, dtype=np.int64)))
    views = [arrived[1000:2000].view(np.float64), memoryview(arrived[5:]), arrived.reshape(256, 256).T]
    del arrived
    gc.collect()
    for view in views:
        assert shared.statistics()["slots_held"] == 1
        assert shm.frame(b"", [], PEER) is None  # nothing to tell yet
        del view
    del views
    gc.collect()
    note = shm.frame(b"payload", [], PEER)  # a message with no buffer still tells the owner
    assert note is not None and len(note) == 1
    assert shared.statistics()["slots_held"] == 1  # until it arrives
    payload, entries = shm.unframe(note[0], PEER)
    assert (bytes(payload), entries) == (b"payload", [])
    assert shared.statistics() == {"bytes_held": 0, "slots_held": 0}


def test_a_buffer_that_finds_no_slot_goes_by_mpi_and_arrives_the_same(shared: shm.Arena) -> None:
    held = receive(send(np.ones(3 << 17)))  # 3 MiB of the 4, held here
    parts = [np.full(1 << 17, 2.0), np.full(1 << 16, 3.0)]  # 1 MiB takes the last MiB; then 512 KiB finds none
    messages = send(parts)
    assert len(messages) == 2 and messages[1].nbytes == 1 << 19
    back = receive(messages)
    assert [part.tolist() for part in back] == [part.tolist() for part in parts]
    assert shm.statistics()["by_mpi"] == 1 and held.sum() == 3 << 17


def test_a_slot_outside_the_owners_arena_is_refused(shared: shm.Arena) -> None:
    first = send(np.zeros(1 << 14))[0]
    forged = first.replace(shm._PART.pack(1 << 17, 0), shm._PART.pack(1 << 17, (4 << 20) - 4096))
    with pytest.raises(ValueError, match="does not have"):
        shm.unframe(forged, PEER)


def test_an_arena_whose_file_is_not_the_one_named_is_not_mapped(shared: shm.Arena) -> None:
    record = bytearray(shm.offer(1 << 20))
    record[-16:-8] = (12345).to_bytes(8, "big")  # another inode
    assert not shm.accept(bytes(shm.offer(1 << 20)) + bytes(record), [0, 7], 0)


def test_no_arena_with_size_zero_and_none_shared_with_a_rank_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_arena", None)
    monkeypatch.setattr(shm, "_mapped", {})
    monkeypatch.setattr(shm, "_freed", {})
    none = shm.offer(0)
    assert shm._arena is None
    assert shm.accept(none + none, [0, PEER], 0) and not shm.active()
    assert shm.frame(b"x", [pickle.PickleBuffer(bytearray(1 << 17))], PEER) is None


def test_a_process_that_may_not_make_an_arena_offers_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_arena", None)

    def refused(name: str, flags: int = 0) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    assert shm.offer(4 << 20) == shm.offer(0) and shm._arena is None
