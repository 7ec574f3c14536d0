"""pydra._core.protocol: every message's encode/decode pair round-trips, and the docs' table is the enum's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pydra._core import protocol
from pydra._core.protocol import Tag
from pydra.comm import serial

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def test_the_architecture_table_lists_exactly_the_tags_of_the_protocol() -> None:
    documented = dict(re.findall(r"^\| `Tag\.([A-Z]+)` \((\d+)\) \|", ARCHITECTURE.read_text(), re.MULTILINE))
    assert documented == {tag.name: str(tag.value) for tag in Tag}


def test_the_protocol_docstring_lists_exactly_the_tags() -> None:
    listed = dict(re.findall(r"^([A-Z]+) (\d+) ", protocol.__doc__, re.MULTILINE))
    assert listed == {tag.name: str(tag.value) for tag in Tag}


def test_every_command_is_documented_in_both_places() -> None:
    ops = {protocol.DEFINE, protocol.CALL, protocol.MAP, protocol.MR_MAP, protocol.GANG, protocol.MR_REDUCE,
           protocol.FORGET, protocol.LOAD, protocol.RESTART, protocol.STOP}
    architecture = ARCHITECTURE.read_text()
    for op in ops:
        assert re.search(rf"``\({op.upper()}[,)]", protocol.__doc__), op
        assert f"`{op.upper()}`" in architecture, op


@pytest.mark.parametrize("record", [
    protocol.ProgressReport(7, 3, 10, "a third"),
    protocol.ProgressReport(8, 1, None, None),
    protocol.LogRecord(None, 1.5, "WARNING", "task", "careful"),
    protocol.Usage(1.25, 4096, 3, 99.0),
    protocol.Bounce(4, serial.dumps(ValueError("x"))),
])
def test_records_round_trip_as_plain_tuples(record) -> None:
    payload = protocol.encode(record)
    assert type(record).__name__.encode() not in payload  # no class name on the wire
    assert protocol.decode(type(record), payload) == record


def test_commands_replies_and_cancels_round_trip() -> None:
    commands = [(protocol.DEFINE, 1, b"blob"), (protocol.CALL, 2, abs, (-1,), {}), (protocol.STOP, 3, False)]
    payload, buffers = protocol.encode_commands(commands)
    assert buffers == [] and protocol.decode_commands(payload) == commands
    replies = [(2, True, serial.dumps(1), 0.5, ())]
    assert protocol.decode_replies(*protocol.encode_replies(5, replies)) == (5, replies)
    assert protocol.decode_cancel(protocol.encode_cancel([4, 5])) == [4, 5]


def test_large_arrays_travel_beside_the_pickle_and_small_ones_inside() -> None:
    """What the wire carries, in one process: large buffers out of band (as received: fresh byte buffers)."""
    np = pytest.importorskip("numpy")
    large, small = np.arange(serial.OUT_OF_BAND_BYTES // 8, dtype=np.float64), np.arange(10)
    payload, buffers = protocol.encode_commands([(protocol.CALL, 1, abs, (large, small), {})])
    assert len(payload) < serial.OUT_OF_BAND_BYTES and [memoryview(b).nbytes for b in buffers] == [large.nbytes]
    arrived = [bytearray(memoryview(b)) for b in buffers]  # what a receiver holds: a copy, writable
    (_, _, _, (got_large, got_small), _), = protocol.decode_commands(payload, arrived)
    assert np.array_equal(got_large, large) and np.array_equal(got_small, small) and got_large.flags.writeable
    blob, value_buffers = protocol.pack_value(large)
    payload, buffers = protocol.encode_replies(3, [(1, True, blob, 0.1, value_buffers)])
    assert len(buffers) == 1
    read, [(uid, ok, blob, seconds, value_buffers)] = protocol.decode_replies(payload, [bytearray(memoryview(buffers[0]))])
    assert (read, uid, ok) == (3, 1, True) and np.array_equal(serial.loads(blob, buffers=value_buffers), large)


def test_plain_arrays_of_a_call_and_a_reply_travel_short_and_the_commands_stay_as_they_were() -> None:
    """The wire form is made at the edge: the scheduler's own commands (a retry resends them, rank 0 may run them) keep their arrays."""
    np = pytest.importorskip("numpy")
    array = np.arange(10.0)
    call = (protocol.CALL, 2, abs, (1, array), {"k": array})
    commands = [(protocol.DEFINE, 1, b"blob"), call]
    payload, buffers = protocol.encode_commands(commands)
    assert payload.count(b"_frombuffer") == 1  # numpy's own form for the keyword's array only: the argument is short
    assert commands[1] is call and call[3][1] is array
    _, (kind, uid, function, (one, got), kwargs) = protocol.decode_commands(payload, buffers)
    assert (kind, uid, function, one) == (protocol.CALL, 2, abs, 1) and np.array_equal(got, array)
    assert np.array_equal(kwargs["k"], array)
    blob, value_buffers = protocol.pack_value(array)
    assert b"numpy" not in blob and np.array_equal(serial.loads(blob, buffers=value_buffers), array)
