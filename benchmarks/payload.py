"""numpy payloads: ``Executor.submit(identity, a)`` round trips against raw mpi4py ``Send``/``Recv``, side by side.

    mpiexec -n 2 python benchmarks/payload.py                  # 1 KiB, 1 MiB, 64 MiB, 1 GiB, a 4-D float32 array
    mpiexec -n 2 python benchmarks/payload.py --scale 0.2      # fewer round trips, quicker
    mpiexec -n 2 python benchmarks/payload.py --cases 1MiB 64MiB
    mpiexec -n 2 python benchmarks/payload.py --seal           # Pydra's messages sealed under a fresh job key

One MPI job of two ranks (rank 0 and one worker). For each case it
alternates, ``--rounds`` times, a raw mpi4py round trip loop (outside any
Pydra session) and a Pydra session doing the same round trips one at a time
with ``Executor.submit(identity, a).result()``, and times every round trip.
The table gives the median round trip of each and the ratio of their rates:

* raw, new buffers: rank 0 ``Send``\\s the array, the worker ``Recv``\\s it
  into a new ``numpy.empty`` of the right shape and dtype (which it is told
  beforehand, for free) and ``Send``\\s it back into a new one on rank 0: what
  a hand-written program that hands each array to user code does;
* raw, reused buffers: the same into buffers allocated once (the machine's
  ceiling: no page of a receive buffer is new);
* Pydra: the array is pickled with its buffer out of band, and the buffer
  copied once into a slot of the sender's shared memory that the receiver
  reads in place (pydra.comm.shm: the two ranks share a host), or moved
  with the same MPI calls as raw's when it finds no room there, when
  ``PYDRA_SHM_BYTES=0`` or when the job seals (docs/ARCHITECTURE.md,
  "Messages"; the last line says which way the buffers went); every result is checked
  in dtype, shape and a sample of its elements, the last one whole (as the
  raw loops check theirs: a whole comparison between two trips would leave
  the worker idle long enough to back off into sleeping);
* pickle-5 floor: a hand-written loop that does only what any protocol of
  Python calls must: rank 0 pickles ``(identity, (a,))`` with protocol 5,
  the array in Pydra's short form for plain arrays (``serial.compact``),
  its buffer out of band, and ``Send``\s the pickle and the buffer; the
  worker receives both (the buffer into a new array, once the pickle has
  said its size), unpickles, calls, and sends the result back the same way.
  No scheduler, no futures, no second thread, busy polling: what is left
  between it and raw MPI is the pickling and the second message, the floor
  of any protocol of Python calls that moves its buffers by MPI.

The target (issue 12): the 1 MiB and 64 MiB round trips at >= 0.8x the raw
round trip with new buffers. The ratio against reused buffers is printed too.
``--seal`` makes a job key on rank 0 and gives it to every rank before the
first session, so every Pydra message is sealed (the raw loop never is).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time
from typing import Callable

import numpy as np
from mpi4py import MPI

import pydra
from pydra.comm import serial, shm
from pydra.config import setting

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
#: name -> (shape, dtype, round trips per round at --scale 1)
CASES: dict[str, tuple[tuple[int, ...], str, int]] = {
    "1KiB": ((KIB // 8,), "float64", 2000),
    "1MiB": ((MIB // 8,), "float64", 300),
    "64MiB": ((64 * MIB // 8,), "float64", 20),
    "1GiB": ((GIB // 8,), "float64", 3),
    "4d-float32": ((32, 32, 64, 64), "float32", 40),  # 16 MiB
}
TARGETS = {"1MiB": 0.8, "64MiB": 0.8}
SAMPLE = 4096  # every SAMPLE-th element of each Pydra result is compared at once, the last result whole


def identity(x):
    """The benchmarked task: the array comes back as it went."""
    return x


def make_array(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An array whose every element differs from its neighbours' (a misplaced byte would show)."""
    return np.arange(int(np.prod(shape)), dtype=np.float64).astype(dtype).reshape(shape)


def raw_round_trips(comm: MPI.Intracomm, array: np.ndarray | None, shape: tuple, dtype: str, trips: int,
                    reuse: bool) -> list[float]:
    """Collective: *trips* raw Send/Recv round trips of *array* between ranks 0 and 1; rank 0's seconds per trip."""
    fresh: Callable[[], np.ndarray] = lambda: np.empty(shape, dtype)  # noqa: E731
    kept = fresh() if reuse else None
    if kept is not None:
        kept.fill(0)  # its pages are in memory before the first trip, as they are for every later one
    comm.Barrier()
    if comm.rank != 0:
        for _ in range(trips):
            buffer = kept if reuse else fresh()
            comm.Recv([buffer, MPI.BYTE], 0, 1)
            comm.Send([buffer, MPI.BYTE], 0, 2)
        return []
    times = []
    for _ in range(trips):
        started = time.perf_counter()
        comm.Send([array, MPI.BYTE], 1, 1)
        back = kept if reuse else fresh()
        comm.Recv([back, MPI.BYTE], 1, 2)
        times.append(time.perf_counter() - started)
    assert np.array_equal(back, array)
    return times


def floor_round_trips(comm: MPI.Intracomm, array: np.ndarray | None, trips: int) -> list[float]:
    """Collective: *trips* round trips of a call pickled by hand (protocol 5, buffers out of band); rank 0's times."""
    status = MPI.Status()

    def send(obj: object, dest: int) -> None:
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(obj, 5, buffer_callback=buffers.append)
        comm.Send([bytes([len(buffers)]) + head, MPI.BYTE], dest, 3)
        for buffer in buffers:
            comm.Send([buffer.raw(), MPI.BYTE], dest, 3)

    def receive(source: int) -> object:
        comm.Probe(source, 3, status)
        head = bytearray(status.Get_count(MPI.BYTE))
        comm.Recv([head, MPI.BYTE], source, 3)
        parts = []
        for _ in range(head[0]):
            comm.Probe(source, 3, status)
            parts.append(np.empty(status.Get_count(MPI.BYTE), np.uint8))
            comm.Recv([parts[-1], MPI.BYTE], source, 3)
        return pickle.loads(memoryview(head)[1:], buffers=parts)

    comm.Barrier()
    if comm.rank != 0:
        for _ in range(trips):
            fn, args = receive(0)  # type: ignore[misc]
            send(serial.compact(fn(*args)), 0)
        return []
    times = []
    for _ in range(trips):
        started = time.perf_counter()
        send((identity, (serial.compact(array),)), 1)
        back = receive(1)
        times.append(time.perf_counter() - started)
    assert np.array_equal(back, array)  # type: ignore[arg-type]
    return times


def pydra_round_trips(comm: MPI.Intracomm, array: np.ndarray | None, trips: int) -> list[float]:
    """Collective: a Pydra session doing *trips* ``submit(identity, array)`` round trips, one at a time."""
    times = []
    with pydra.Executor(comm) as executor:
        if executor is None:
            return []
        executor.submit(identity, array[:1]).result()  # the first call also ships the function
        for _ in range(trips):
            started = time.perf_counter()
            back = executor.submit(identity, array).result()
            times.append(time.perf_counter() - started)
            # Between two trips only a sample: comparing 64 MiB takes ~8 ms, long enough for the worker's
            # polling to back off into sleeps of up to PYDRA_IDLE_SLEEP, a wake-up the next trip would pay
            # (the raw loops compare only their last result).
            assert back.dtype == array.dtype and back.shape == array.shape
            assert np.array_equal(back.reshape(-1)[::SAMPLE], array.reshape(-1)[::SAMPLE])
        assert np.array_equal(back, array)
    return times


def start_sealing_everywhere(comm: MPI.Intracomm) -> None:
    """Give every rank one fresh job key before the first session (which reads and removes it)."""
    import secrets

    key = comm.bcast(secrets.token_hex(32) if comm.rank == 0 else None, root=0)
    os.environ["PYDRA_JOB_KEY"] = key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every number of round trips by this")
    parser.add_argument("--rounds", type=int, default=3, help="raw and Pydra alternate this many times per case")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="which arrays")
    parser.add_argument("--seal", action="store_true", help="seal Pydra's messages under a fresh job key")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run me with: mpiexec -n 2 python benchmarks/payload.py")
    if args.seal:
        start_sealing_everywhere(comm)
    # A 1 GiB array pickles to a little more than PYDRA_MAX_RESULT_BYTES' default.
    os.environ["PYDRA_MAX_RESULT_BYTES"] = str(4 * GIB)
    rows = []
    for name in args.cases:
        shape, dtype, trips = CASES[name]
        trips = max(2, int(trips * args.scale))
        array = make_array(shape, dtype) if comm.rank == 0 else None
        measured: dict[str, list[float]] = {"new": [], "reused": [], "floor": [], "pydra": []}
        for _ in range(args.rounds):
            measured["new"] += raw_round_trips(comm, array, shape, dtype, trips, reuse=False)
            measured["reused"] += raw_round_trips(comm, array, shape, dtype, trips, reuse=True)
            measured["floor"] += floor_round_trips(comm, array, trips)
            measured["pydra"] += pydra_round_trips(comm, array, trips)
        if comm.rank == 0:
            rows.append((name, np.dtype(dtype).itemsize * int(np.prod(shape)), trips * args.rounds,
                         {kind: statistics.median(times) for kind, times in measured.items()}))
        del array
    if comm.rank == 0:
        report(rows, args.seal)
        moved = shm.statistics()
        print(f"Pydra's arrays from rank 0: {moved['shared']} through shared memory, {moved['by_mpi']} by MPI"
              f" (PYDRA_SHM_BYTES={setting('SHM_BYTES')}{', sealed' if args.seal else ''})")


def report(rows: list, sealed: bool) -> None:
    """Print the table, the ratios and whether the targets are met."""
    pydra_label = "Pydra sealed" if sealed else "Pydra"
    kinds = ("new", "reused", "floor", "pydra")
    labels = ("raw new buffers", "raw reused", "pickle-5 floor", pydra_label)
    print(f"{'case':>11} {'bytes':>13} {'trips':>6}  " + "  ".join(f"{label:>19}" for label in labels)
          + f"  {'/ raw new':>9}  {'/ reused':>8}  {'floor / raw new':>15}")
    met = []
    for name, nbytes, trips, median in rows:
        rate = {kind: 2 * nbytes / seconds / 1e9 for kind, seconds in median.items()}  # both ways, GB/s
        cells = [f"{median[kind] * 1e3:9.3f} ms {rate[kind]:5.2f} GB/s" for kind in kinds]
        ratio, ceiling, floor = rate["pydra"] / rate["new"], rate["pydra"] / rate["reused"], rate["floor"] / rate["new"]
        print(f"{name:>11} {nbytes:>13,} {trips:>6}  " + "  ".join(f"{cell:>19}" for cell in cells)
              + f"  {ratio:8.2f}x  {ceiling:7.2f}x  {floor:14.2f}x")
        if name in TARGETS and not sealed:
            met.append(f"{name}: {ratio:.2f}x raw (target >= {TARGETS[name]}): "
                       f"{'met' if ratio >= TARGETS[name] else 'NOT MET'}; the pickle-5 floor reaches {floor:.2f}x")
    print(f"\n{MPI.Get_library_version().splitlines()[0].strip()}, 2 ranks on {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; GB/s counts the bytes of both directions; medians of every trip")
    for line in met:
        print(line)
    medians = {name: median for name, _, _, median in rows}
    if "1KiB" in medians:
        fixed = medians["1KiB"]["pydra"] - medians["1KiB"]["new"]
        print(f"a call's fixed cost (1 KiB round trip, Pydra less raw): {fixed * 1e3:.3f} ms")

if __name__ == "__main__":
    main()
