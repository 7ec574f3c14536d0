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
    c_order = np.arange(1000, dtype=np.float64)
    f_order = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4))
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


def test_another_serializer_keeps_everything_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """With PYDRA_SERIALIZER set, the serializer's own pickle carries the arrays."""
    used = []

    def dumps(obj: object) -> bytes:
        used.append(obj)
        return pickle.dumps(obj, 5)

    monkeypatch.setattr(serial, "dumps", dumps)
    monkeypatch.setattr(serial, "loads", lambda data: pickle.loads(data))
    array = np.arange(100)
    back, pieces = round_trip({"a": [array]})
    assert used and len(pieces) == 2
    assert np.array_equal(back["a"][0], array)
