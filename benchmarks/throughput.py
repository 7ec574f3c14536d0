"""No-op task throughput: Pydra against a raw mpi4py loop and mpi4py.futures, side by side.

    python benchmarks/throughput.py                 # all variants, 3 ranks (2 workers)
    python benchmarks/throughput.py --scale 0.2     # fewer tasks, quicker
    python benchmarks/throughput.py --seal          # Pydra sealed (PYDRA_JOB_KEY) vs unsealed

Every variant runs as its own ``mpiexec -n 3`` job of this same file and
times only its task loop (not MPI start-up); the driver prints tasks/s and
the ratios the project tracks:

* raw mpi4py: rank 0 sends one task per message to each worker and waits for
  the answer before sending that worker the next one (the hand-written limit);
* Pydra ``Executor.map(chunksize=1)``: one task per message, pipelined;
* Pydra ``Executor.map(chunksize=None)``: adaptive batching;
* Pydra ``Executor.submit``: one future per call, all submitted first, then
  ``concurrent.futures.wait`` for them all and sum their results;
* ``mpi4py.futures.MPIPoolExecutor.map(chunksize=1)``;
* futures alone: the submit variant's ``concurrent.futures`` part with nothing
  else (no MPI, no scheduler: a thread of rank 0 runs each call and resolves
  its plain ``Future``). It is what an executor returning plain futures from
  one Python process costs at the least; Pydra's futures are leaner ones
  (docs/ARCHITECTURE.md, "What a submitted call costs, and the limit").

With ``--seal`` it runs instead the Pydra variants twice each, without and
with a job key (every message sealed, docs/SECURITY.md), plus a payload
round trip (``Executor.submit(noop, a)`` for a 1 MiB numpy array, one at a
time), and prints the two side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RANKS = 3
TASKS = {"raw": 200_000, "pydra-chunksize-1": 200_000, "pydra-auto": 5_000_000, "pydra-submit": 20_000,
         "mpi4py-futures": 20_000, "futures-alone": 20_000}
#: the --seal comparison: each of these unsealed, then sealed
SEALED_TASKS = {"pydra-chunksize-1": 200_000, "pydra-auto": 5_000_000, "pydra-numpy-1mib": 1_000}
ARRAY_BYTES = 1 << 20


def noop(x: int) -> int:
    """The benchmarked task: as close to nothing as a Python call gets."""
    return x


def measure(variant: str, tasks: int) -> float:
    """Run *tasks* no-op tasks with *variant* inside this MPI job; seconds on rank 0 (else -1)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if variant == "raw":
        return _raw_loop(comm, tasks)
    if variant == "mpi4py-futures":
        from mpi4py.futures import MPIPoolExecutor

        with MPIPoolExecutor() as executor:
            started = time.perf_counter()
            assert sum(executor.map(noop, range(tasks), chunksize=1)) == tasks * (tasks - 1) // 2
            return time.perf_counter() - started
    if variant == "futures-alone":
        return _submit_all(_FuturesAlone(), tasks) if comm.rank == 0 else -1.0
    import pydra

    chunksize = 1 if variant == "pydra-chunksize-1" else None
    with pydra.Executor() as executor:
        if executor is None:
            return -1.0
        if variant == "pydra-numpy-1mib":
            return _round_trips(executor, tasks)
        if variant == "pydra-submit":
            return _submit_all(executor, tasks)
        started = time.perf_counter()
        assert sum(executor.map(noop, range(tasks), chunksize=chunksize)) == tasks * (tasks - 1) // 2
        return time.perf_counter() - started


def _submit_all(executor, tasks: int) -> float:
    """*tasks* calls ``executor.submit(noop, i)``, then a wait for all their futures and the sum of their results."""
    import concurrent.futures

    started = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(tasks)]
    _, not_done = concurrent.futures.wait(futures)
    assert not not_done and sum(future.result() for future in futures) == tasks * (tasks - 1) // 2
    return time.perf_counter() - started


class _FuturesAlone:
    """``submit`` with only its ``concurrent.futures`` part: one thread runs the calls and resolves their futures."""

    def __init__(self) -> None:
        import collections
        import threading

        self.queue: collections.deque = collections.deque()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, fn, arg):
        import concurrent.futures

        future = concurrent.futures.Future()
        self.queue.append((future, fn, arg))
        return future

    def _run(self) -> None:
        while True:
            try:
                future, fn, arg = self.queue.popleft()
            except IndexError:
                time.sleep(0)  # let the submitting thread have the GIL
                continue
            future.set_running_or_notify_cancel()
            future.set_result(fn(arg))


def _round_trips(executor, tasks: int) -> float:
    """*tasks* round trips of a 1 MiB array to a worker and back, one at a time."""
    import numpy as np

    array = np.arange(ARRAY_BYTES // 8, dtype=np.float64)
    started = time.perf_counter()
    for _ in range(tasks):
        back = executor.submit(noop, array).result()
    elapsed = time.perf_counter() - started
    assert np.array_equal(back, array)
    return elapsed


def _raw_loop(comm, tasks: int) -> float:
    """The classic master/worker loop: one task per message, one message in flight per worker."""
    from mpi4py import MPI

    if comm.rank != 0:
        while True:
            task = comm.recv(source=0)
            if task is None:
                return -1.0
            comm.send(noop(task), dest=0)
    started = time.perf_counter()
    next_task, total, status = 0, 0, MPI.Status()
    for worker in range(1, comm.size):
        comm.send(next_task, dest=worker)
        next_task += 1
    for _ in range(tasks):
        total += comm.recv(source=MPI.ANY_SOURCE, status=status)
        if next_task < tasks:
            comm.send(next_task, dest=status.Get_source())
            next_task += 1
    elapsed = time.perf_counter() - started
    for worker in range(1, comm.size):
        comm.send(None, dest=worker)
    assert total == tasks * (tasks - 1) // 2
    return elapsed


def run_variant(mpiexec, variant: str, tasks: int, sealed: bool = False) -> float:
    """Seconds *variant* takes for *tasks* tasks in its own ``mpiexec -n 3`` job (*sealed*: with a job key)."""
    import secrets

    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("PYDRA_JOB_KEY", None)
    if sealed:
        env["PYDRA_JOB_KEY"] = secrets.token_hex(32)
    program = [sys.executable]
    if variant == "mpi4py-futures":
        program += ["-m", "mpi4py.futures"]
    program += [str(HERE), "--variant", variant, "--tasks", str(tasks)]
    done = subprocess.run(mpiexec.command(RANKS, program), capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{variant} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1])["seconds"]


def scaled(tasks: int, scale: float, least: int = 1000) -> int:
    return max(least, int(tasks * scale))


def drive(scale: float) -> None:
    """Run every variant as its own MPI job and print the comparison."""
    from pydra.launcher.mpiexec import find_mpiexec

    mpiexec = find_mpiexec()
    rates: dict[str, float] = {}
    for variant, tasks in TASKS.items():
        tasks = scaled(tasks, scale)
        seconds = run_variant(mpiexec, variant, tasks)
        rates[variant] = tasks / seconds
        print(f"{variant:>20}: {tasks:>9,} tasks in {seconds:7.3f} s = {rates[variant]:>12,.0f} tasks/s")
    print(f"\n{mpiexec.implementation}, {RANKS} ranks (2 workers) on {os.cpu_count()} cores")
    print(f"pydra chunksize=1 / raw mpi4py loop  = {rates['pydra-chunksize-1'] / rates['raw']:6.2f}x  (target >= 0.5)")
    print(f"pydra chunksize=1 / mpi4py.futures   = {rates['pydra-chunksize-1'] / rates['mpi4py-futures']:6.2f}x  (target >= 10)")
    print(f"pydra auto batching                  = {rates['pydra-auto']:,.0f} tasks/s  (target >= 1,000,000)")
    print(f"pydra submit / raw mpi4py loop       = {rates['pydra-submit'] / rates['raw']:6.2f}x  (target >= 0.5)")
    print(f"  futures alone / raw mpi4py loop    = {rates['futures-alone'] / rates['raw']:6.2f}x  "
          "(plain Futures, no MPI, no scheduler)")
    print(f"  pydra submit / futures alone       = {rates['pydra-submit'] / rates['futures-alone']:6.2f}x")


def drive_sealed(scale: float) -> None:
    """Each Pydra variant unsealed, then sealed, as separate MPI jobs; print them side by side."""
    from pydra.launcher.mpiexec import find_mpiexec

    mpiexec = find_mpiexec()
    print(f"{'variant':>20}  {'tasks':>9}  {'unsealed /s':>13}  {'sealed /s':>13}  sealed/unsealed")
    for variant, tasks in SEALED_TASKS.items():
        tasks = scaled(tasks, scale, least=50 if variant == "pydra-numpy-1mib" else 1000)
        plain, sealed = (tasks / run_variant(mpiexec, variant, tasks, sealed=on) for on in (False, True))
        print(f"{variant:>20}  {tasks:>9,}  {plain:>13,.0f}  {sealed:>13,.0f}  {sealed / plain:6.2f}x")
    print(f"\n{mpiexec.implementation}, {RANKS} ranks (2 workers) on {os.cpu_count()} cores; "
          f"pydra-numpy-1mib counts round trips of a {ARRAY_BYTES >> 20} MiB array (one in flight)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every task count by this")
    parser.add_argument("--seal", action="store_true", help="compare Pydra sealed and unsealed (PYDRA_JOB_KEY)")
    parser.add_argument("--variant", choices=sorted({*TASKS, *SEALED_TASKS}), help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is None:
        (drive_sealed if args.seal else drive)(args.scale)
        return
    seconds = measure(args.variant, args.tasks)
    if seconds >= 0:
        print(json.dumps({"variant": args.variant, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
