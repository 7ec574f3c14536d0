"""pydra.comm.serial: messages to bytes and back, numpy arrays' data out of band."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from pydra.comm import serial

np = pytest.importorskip("numpy")

LARGE = serial.OUT_OF_BAND_BYTES // 8  # float64 elements: just out of band

# Arrays whose data pickle leaves to the caller (out of band when large), in both orders.
PLAIN = {
    "small float64": np.arange(10.0),
    "large float64": np.arange(LARGE, dtype=np.float64),
    "4-d float32": np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5),
    "Fortran order, in band": np.asfortranarray(np.arange(12).reshape(3, 4)),
    "Fortran order, out of band": np.asfortranarray(np.arange(2 * LARGE, dtype=np.float64).reshape(2, LARGE)),
    "big-endian int32": np.arange(5, dtype=">i4"),
    "float16": np.arange(4, dtype=np.float16),
    "complex": np.arange(3) + 1j,
    "bool": np.array([True, False, True]),
    "text": np.array(["ab", "c"]),
    "bytes": np.array([b"ab", b"c"]),
    "empty 2-d": np.zeros((0, 3)),
    "0-d": np.array(3.5),
}
# Arrays of other kinds: no buffer, fields, objects, gaps, a subclass.
OTHERS = {
    "structured": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "objects": np.array([1, "x"], dtype=object),
    "datetimes": np.datetime64("2020-01-01") - np.arange(3).astype("timedelta64[D]"),
    "strided": np.arange(12).reshape(3, 4)[:, ::2],
    "masked": np.ma.masked_array([1, 2, 3], [0, 1, 0]),
}


def received(buffers: list) -> list:
    """The buffers as a receiver holds them: flat copies (as pydra.comm.mpi sends them), writable."""
    return [np.frombuffer(bytearray(memoryview(buffer).cast("B")), np.uint8) for buffer in buffers]


def assert_same(got, sent) -> None:
    assert type(got) is type(sent) and got.dtype == sent.dtype and got.shape == sent.shape
    assert np.array_equal(got, sent)
    assert got.flags.c_contiguous == sent.flags.c_contiguous and got.flags.f_contiguous == sent.flags.f_contiguous


@pytest.mark.parametrize("name", PLAIN)
def test_arrays_arrive_exact_their_large_data_out_of_band(name: str) -> None:
    sent = PLAIN[name]
    payload, buffers = serial.dumps_oob(sent)
    assert len(buffers) == (sent.nbytes >= serial.OUT_OF_BAND_BYTES)
    got = serial.loads(payload, buffers=received(buffers))
    assert_same(got, sent)
    assert got.flags.writeable
    assert_same(serial.loads(payload, buffers=buffers), sent)  # loaded where it was made: the sender's own buffers


@pytest.mark.parametrize("name", OTHERS)
def test_other_arrays_arrive_exact(name: str) -> None:
    sent = OTHERS[name]
    payload, buffers = serial.dumps_oob(sent)
    got = serial.loads(payload, buffers=received(buffers))
    assert type(got) is type(sent) and got.dtype == sent.dtype and np.array_equal(got, sent)


@pytest.mark.parametrize("size", [10, LARGE])
def test_a_read_only_array_arrives_read_only(size: int) -> None:
    sent = np.arange(size, dtype=np.float64)
    sent.flags.writeable = False
    payload, buffers = serial.dumps_oob(sent)
    got = serial.loads(payload, buffers=received(buffers))
    assert np.array_equal(got, sent) and not got.flags.writeable


#: the arrays of PLAIN that serial.compact gives its short wire form (the others keep numpy's)
COMPACT = {"small float64", "large float64", "4-d float32", "float16", "complex", "bool", "empty 2-d", "0-d"}


@pytest.mark.parametrize("name", [*PLAIN, *OTHERS])
def test_plain_arrays_travel_short_and_arrive_as_numpy_pickles_them(name: str) -> None:
    sent = {**PLAIN, **OTHERS}[name]
    wire = serial.compact(sent)
    assert (wire is not sent) == (name in COMPACT)
    payload, buffers = serial.dumps_oob(wire)
    if name in COMPACT:
        assert b"numpy" not in payload  # no dtype object, no numpy function: a code and a shape
    got = serial.loads(payload, buffers=received(buffers))
    mine_payload, mine_buffers = serial.dumps_oob(sent)
    theirs = serial.loads(mine_payload, buffers=received(mine_buffers))
    assert type(got) is type(theirs) and got.dtype == theirs.dtype and got.shape == theirs.shape
    assert np.array_equal(got, sent) and got.flags.writeable == theirs.flags.writeable
    assert (got.flags.c_contiguous, got.flags.f_contiguous) == (theirs.flags.c_contiguous, theirs.flags.f_contiguous)


@pytest.mark.parametrize("size", [10, LARGE])
def test_a_read_only_plain_array_arrives_read_only_as_numpy_pickles_it(size: int) -> None:
    sent = np.arange(size, dtype=np.float64)
    sent.flags.writeable = False
    expected = _through(sent)
    got = _through(serial.compact(sent))
    assert np.array_equal(got, sent) and not got.flags.writeable and not expected.flags.writeable


def _through(obj: object) -> object:
    """*obj* pickled and unpickled as a receiver gets it."""
    payload, buffers = serial.dumps_oob(obj)
    return serial.loads(payload, buffers=received(buffers))


def test_compact_args_makes_a_new_tuple_only_for_arrays() -> None:
    plain = (1, "x", [np.arange(3)])  # an array inside a list keeps numpy's own form
    assert serial.compact_args(plain) is plain and serial.compact_args(()) == ()
    array = np.arange(4.0)
    args = serial.compact_args((1, array))
    assert args[0] == 1 and args[1] is not array
    number, got = _through(args)
    assert number == 1 and np.array_equal(got, array)


@pytest.mark.parametrize("size", [0, serial.OUT_OF_BAND_BYTES - 1, serial.OUT_OF_BAND_BYTES, 3 << 20])
def test_large_bytes_go_out_of_band_and_arrive_as_bytes(size: int) -> None:
    """pickle copies bytes into the message at any size; in their wire form the large ones' data goes beside it."""
    sent = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    wire = serial.compact(sent)
    assert (wire is sent) == (size < serial.OUT_OF_BAND_BYTES)
    payload, buffers = serial.dumps_oob(wire)
    assert len(buffers) == (size >= serial.OUT_OF_BAND_BYTES)
    assert len(payload) < 100 if buffers else len(payload) > size  # the data beside the message, or in it
    got = serial.loads(payload, buffers=received(buffers))
    assert type(got) is bytes and got == sent
    assert serial.loads(serial.dumps(wire)) == sent  # all in band (a journal's record, say): the same bytes


def test_compact_args_takes_large_bytes_too() -> None:
    small, large = b"x" * 10, b"y" * serial.OUT_OF_BAND_BYTES
    assert serial.compact_args((1, small)) == (1, small)
    args = serial.compact_args((small, large))
    assert args[0] is small and args[1] is not large
    assert _through(args) == (small, large)


def test_only_pickle_and_cloudpickle_take_the_short_form() -> None:
    """Another serializer gets arrays as they are (dill's pure-Python pickler trips on in-band PickleBuffers)."""
    code = ("import numpy; from pydra.comm import serial; a = numpy.arange(3.0)\n"
            "for name in ('dill', 'cloudpickle', 'pickle'):\n"
            "    serial.use(name); print(name, serial.compact(a) is a, serial.compact_args((a,))[0] is a)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[:3] == ["dill True True", "cloudpickle False False", "pickle False False"]


def test_every_serializer_the_error_names_an_extra_for_is_one() -> None:
    """``use`` tells a user without the module to pip install pydra-mpi[name]: that extra must exist."""
    import importlib.metadata

    extras = set(importlib.metadata.metadata("pydra-mpi").get_all("Provides-Extra") or ())
    assert {name for name in serial.SERIALIZERS if name != "pickle"} <= extras


def test_threads_pickling_at_once_each_get_their_own_message() -> None:
    errors: list[BaseException] = []

    def pickle_many(offset: int) -> None:
        try:
            for step in range(300):
                sent = np.arange(LARGE if step % 2 else 10, dtype=np.float64) + offset
                payload, buffers = serial.dumps_oob((offset, sent))
                number, got = serial.loads(payload, buffers=received(buffers))
                assert number == offset
                assert_same(got, sent)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=pickle_many, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_pickling_a_message_does_not_import_numpy() -> None:
    code = ("import sys; from pydra.comm import serial; serial.loads(serial.dumps_oob([1, b'x' * 99999])[0]); "
            "serial.compact(1); serial.compact_args((2,)); "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
