"""The shuffle's payloads: numpy arrays' data out of band, everything back as it was.

No MPI job here (the exchange itself runs in tests/core/test_mapreduce.py's
jobs, numpy values included): ``_pack`` and ``_unpack`` round trips.
"""

from __future__ import annotations

import pickle

import mpi4py
import numpy as np
import pytest

# The pytest process is no MPI job: importing pydra.comm.shuffle must not initialise MPI here.
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

from pydra.comm import serial, shuffle  # noqa: E402


def round_trip(bucket: object) -> tuple[object, list]:
    pieces = shuffle._pack(bucket)
    return shuffle._unpack(memoryview(b"".join(pieces))), pieces


def test_arrays_travel_out_of_band_and_come_back_writable() -> None:
    # (buffers from serial.OUT_OF_BAND_BYTES up leave the pickle; smaller ones are cheaper in it)
    c_order = np.arange(10_000, dtype=np.float64)
    f_order = np.asfortranarray(np.arange(24_000, dtype=np.int32).reshape(20, 30, 40))
    bucket = {"c": [c_order], ("f", 1): [f_order], "strided": [c_order[::3]], "text": ["x" * 10], "none": [None]}
    back, pieces = round_trip(bucket)
    assert len(pieces) == 2 + 2  # head, pickle, and the two contiguous arrays' data
    assert len(pieces[1]) < c_order.nbytes  # not in the pickle
    assert back.keys() == bucket.keys()
    for key, (value,) in bucket.items():
        (got,) = back[key]
        if isinstance(value, np.ndarray):
            assert np.array_equal(got, value) and got.dtype == value.dtype and got.shape == value.shape
            assert got.flags.writeable
            got[...] = 0  # its own memory: the received bytes are not pinned or written through
        else:
            assert got == value
    assert back[("f", 1)][0].flags.f_contiguous


@pytest.mark.parametrize("bucket", [{}, {1: [b"bytes", 2.5]}, {"empty": [np.empty(0)]}])
def test_buckets_without_big_buffers(bucket: dict) -> None:
    back, _ = round_trip(bucket)
    assert pickle.dumps(back) == pickle.dumps(bucket)


def test_a_serializer_without_out_of_band_buffers_keeps_everything_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PYDRA_SERIALIZER whose pickles take no buffer_callback (serial.use gives it this dumps_oob)."""
    used = []

    def dumps_oob(obj: object) -> tuple[bytes, list]:
        used.append(obj)
        return pickle.dumps(obj, 5), []

    monkeypatch.setattr(serial, "dumps_oob", dumps_oob)
    monkeypatch.setattr(serial, "loads", lambda data, buffers=(): pickle.loads(data))
    array = np.arange(100_000)
    back, pieces = round_trip({"a": [array]})
    assert used and len(pieces) == 2
    assert np.array_equal(back["a"][0], array)
