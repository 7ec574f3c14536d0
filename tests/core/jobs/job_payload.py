"""numpy arrays and other protocol-5 buffers as arguments and results; see tests/core/test_payload.py.

    mpiexec -n 3 python tests/core/jobs/job_payload.py exact    # every kind of array, every path
    mpiexec -n 2 python tests/core/jobs/job_payload.py huge     # one array of more than 2 GiB, there and back
    PYDRA_SHM_BYTES=4194304 mpiexec -n 2 python tests/core/jobs/job_payload.py arena   # results kept past it

``exact`` sends every value of :func:`values` to a worker through
``Executor.submit``, ``Executor.map`` (several arrays in one command) and a
GangTask (the same arguments to every member), and prints one ``RESULT``
line of JSON: per value and path, what the worker saw (a fingerprint: type,
dtype, shape, memory order, writability, SHA-256 of the bytes), what came
back, and where each large array's memory is on arrival: a receive buffer
of its own or a slot of the sender's shared memory (both out of band), or a
copy out of the pickle. The test compares
them with the fingerprints of the originals, computed here on rank 0.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import signal
import sys

import numpy as np
from mpi4py import MPI

import pydra


def values() -> dict[str, object]:
    """The values under test, by name: large ones (out of band) and small ones (in the pickle)."""
    rng = np.random.default_rng(12)
    grid = rng.standard_normal((500, 600))
    large = rng.standard_normal(1 << 17)  # 1 MiB
    readonly = np.arange(1 << 16, dtype=np.int64)
    readonly.flags.writeable = False
    piece = large[:20_000].copy()
    structured = np.zeros(20_000, dtype=[("x", "f8"), ("y", "i4"), ("name", "U3")])
    structured["x"], structured["y"], structured["name"] = rng.standard_normal(20_000), np.arange(20_000), "abc"
    return {
        "float64-1MiB": large,
        "int32-small": np.arange(100, dtype=np.int32),
        "uint8-64KiB": rng.integers(0, 256, 1 << 16, dtype=np.uint8),  # just out of band
        "uint8-64KiB-less-1": rng.integers(0, 256, (1 << 16) - 1, dtype=np.uint8),  # just in band
        "fortran-float32": np.asfortranarray(rng.standard_normal((300, 400)).astype(np.float32)),
        "non-contiguous": grid[:, ::3],
        "transposed": grid.T,
        "zero-size-2d": np.empty((0, 5)),
        "zero-size": np.zeros(0, dtype=np.int16),
        "4d-float32": rng.standard_normal((8, 16, 32, 33)).astype(np.float32),
        "big-endian": np.arange(50_000, dtype=">i8"),
        "complex128": rng.standard_normal(40_000) + 1j * rng.standard_normal(40_000),
        "bool": rng.integers(0, 2, 100_000).astype(bool),
        "structured": structured,
        "datetime64": np.arange("2026-01-01", "2026-03-01", dtype="datetime64[m]"),
        "object": np.array([1, "two", None, 3.0], dtype=object),
        "readonly": readonly,
        "bytearray": bytearray(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()),
        "bytes": rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes(),  # out of band in a call and a result
        "bytes-small": b"\x00pydra\xff",
        "nested": {"a": [large, (np.arange(7), {"deep": grid[:100]})], "b": (np.empty((0, 3)), grid[:, :1].copy()),
                   "same twice": [piece, piece]},
    }


def fingerprint(value: object) -> object:
    """What must survive the trip: for arrays type, dtype, shape, order, writability and the bytes' digest."""
    if isinstance(value, np.ndarray):
        order = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
        digest = hashlib.sha256(value.tobytes() if value.dtype != object else repr(value.tolist()).encode()).hexdigest()
        return ["ndarray", value.dtype.str, list(value.shape), order, value.flags.writeable, digest]
    if isinstance(value, (bytes, bytearray)):
        return [type(value).__name__, hashlib.sha256(value).hexdigest()]
    if isinstance(value, dict):
        return {key: fingerprint(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [fingerprint(item) for item in value]]
    return repr(value)


def large_arrays(value: object) -> list[np.ndarray]:
    """The arrays of 64 KiB or more in *value*, in order (those pickle protocol 5 may leave out of the pickle)."""
    if isinstance(value, dict):
        return [array for item in value.values() for array in large_arrays(item)]
    if isinstance(value, (list, tuple)):
        return [array for item in value for array in large_arrays(item)]
    if isinstance(value, np.ndarray) and value.nbytes >= 1 << 16 and value.dtype != object:
        return [value]
    return []


def exposes_buffer(value: object) -> list[bool]:
    """For each large array of an original: whether it exposes its buffer to pickle protocol 5 (so goes out of band).

    numpy does for contiguous arrays (C or Fortran order), except datetime
    and timedelta ones, which it always copies into the pickle.
    """
    flags = []
    for array in large_arrays(value):
        buffers: list = []
        pickle.dumps(array, 5, buffer_callback=buffers.append)
        flags.append(bool(buffers))
    return flags


def arrivals(value: object) -> list[str]:
    """For each large array of a received value, where its memory is: "buffer" (an MPI receive buffer of its
    own), "shared" (a slot of the sender's shared memory, pydra.comm.shm) or "pickle" (a copy out of the pickle)."""
    kinds = []
    for array in large_arrays(value):
        root: object = array
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        if isinstance(root, memoryview):  # a read-only buffer is handed over as a read-only view of it
            root = root.obj
            while isinstance(root, np.ndarray) and root.base is not None:
                root = root.base
        if isinstance(root, ctypes.Array):
            kinds.append("shared")
        elif isinstance(root, np.ndarray) and root.dtype == np.uint8 and root is not array:
            kinds.append("buffer")
        else:
            kinds.append("pickle")
    return kinds


def echo(value: object) -> tuple:
    """On a worker: what arrived, where its large arrays' memory is, and the value itself, sent back."""
    return fingerprint(value), arrivals(value), value


class Members(pydra.GangTask):
    """Every worker: each member fingerprints its copy of the arguments; gang rank 0 sends back all and the value."""

    def work(self, value):
        seen = self.comm.gather(fingerprint(value), root=0)
        return (seen, value) if self.comm.rank == 0 else None


def exact() -> None:
    with pydra.Executor() as executor:
        if executor is None:
            return
        cases = values()
        report: dict[str, dict] = {}
        for name, value in cases.items():
            there, band, back = executor.submit(echo, value).result()
            report[name] = {"submit": [there, fingerprint(back)], "there": band, "back": arrivals(back)}
        for name, (there, band, back) in zip(cases, executor.map(echo, cases.values(), chunksize=4)):
            report[name]["map"] = [there, fingerprint(back)]
        seen, back = executor.submit_task(Members(), cases["nested"]).result()
        report["nested"]["gang"] = [seen, fingerprint(back)]
        twice = back["same twice"]
        report["nested"]["same object twice"] = twice[0] is twice[1]
        print("RESULT " + json.dumps({"expected": {name: fingerprint(value) for name, value in cases.items()},
                                      "exposes buffer": {name: exposes_buffer(value) for name, value in cases.items()},
                                      "report": report, "members": max(1, MPI.COMM_WORLD.size - 1)}), flush=True)


def count_up(array: np.ndarray) -> tuple[bool, np.ndarray]:
    """On a worker: whether a huge array holds 0, 1, 2, ... (summed, so no copy of it is made), and the array."""
    n = array.size
    return bool(int(array.sum(dtype=np.uint64)) == n * (n - 1) // 2 and array[-1] == n - 1), array


def huge() -> None:
    with pydra.Executor() as executor:
        if executor is None:
            return
        array = np.arange((2**31 + 2**20) // 4, dtype=np.uint32)  # 2 GiB and 1 MiB
        right_there, back = executor.submit(count_up, array).result()
        print("RESULT " + json.dumps({"bytes": int(array.nbytes), "right there": right_there,
                                      "back equal": bool(back.dtype == array.dtype and np.array_equal(back, array))}),
              flush=True)


def negate(array: np.ndarray) -> np.ndarray:
    return -array


def sharing() -> dict:
    """On a worker: its pydra.comm.shm statistics."""
    from pydra.comm import shm

    return shm.statistics()


def arena() -> None:
    """Twelve 1 MiB results kept on rank 0 (past a worker's arena of 4 MiB), then dropped, then three more."""
    from pydra.comm import shm

    with pydra.Executor() as executor:
        if executor is None:
            return
        array = np.arange(1 << 17, dtype=np.float64)
        kept = [executor.submit(negate, array).result() for _ in range(12)]
        report = {"kept": arrivals(kept), "kept exact": all(np.array_equal(item, -array) for item in kept),
                  "worker while kept": executor.submit(sharing).result()}
        del kept
        later = [executor.submit(negate, array).result() for _ in range(3)]
        report.update({"later": arrivals(later), "later exact": all(np.array_equal(item, -array) for item in later),
                       "worker after": executor.submit(sharing).result(), "rank 0": shm.statistics()})
        print("RESULT " + json.dumps(report), flush=True)


def made_by(i: str) -> np.ndarray:
    """Item *i* of :func:`one_worker_dies`: 1 MiB of float(i); the process that made item 0 later kills itself."""
    i, marks = int(i), os.environ["MARKS"]
    if i == 0:
        with open(f"{marks}/first", "a") as mark:  # a line per run: the test wants one
            mark.write(f"{os.getpid()}\n")
    elif i >= 8 and not os.path.exists(f"{marks}/died") and os.path.exists(f"{marks}/first"):
        with open(f"{marks}/first") as mark:
            if mark.readline().strip() == str(os.getpid()):
                open(f"{marks}/died", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
    return np.full(1 << 17, float(i))


def one_worker_dies() -> pydra.Task:
    """TARGET for ``pydra run -n 3``: arrays made by a worker that dies later (its arena's slots) stay whole."""
    return pydra.Parallel(made_by, chunksize=1)


if __name__ == "__main__":
    {"exact": exact, "huge": huge, "arena": arena}[sys.argv[1]]()
