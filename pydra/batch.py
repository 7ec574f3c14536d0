"""``pydra run``: run one task tree as an MPI job and report its result.

Run under ``mpiexec -n N python -m pydra run ...`` every rank executes
:func:`run_job`; rank 0 resolves the target, ships it to the others, and
prints or writes the result. ``pydra run -n N`` starts that mpiexec itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from pydra.errors import RemoteTraceback, TargetError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run_locally(ranks: int, forwarded: list[str]) -> int:
    """Start ``mpiexec -n ranks python -m pydra run ...`` on this host and return its status."""
    from pydra.launcher.mpiexec import MPIExecError, find_mpiexec

    try:
        mpiexec = find_mpiexec()
    except MPIExecError as exc:
        print(f"pydra: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    command = mpiexec.command(ranks, [sys.executable, "-m", "pydra", "run", *forwarded])
    return wait_for(subprocess.Popen(command))


def wait_for(process: subprocess.Popen) -> int:
    """Wait for a launched mpiexec and return its status, passing SIGTERM and Ctrl-C on to it."""
    # A SIGTERM for us goes to mpiexec, and we wait while it stops its ranks: dying at once
    # would leave whoever stops us free to SIGKILL mpiexec halfway through that cleanup.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue  # mpiexec got the same Ctrl-C and is stopping its ranks
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(target: str, inputs: list[str], output: str | None) -> int:
    """Collective over MPI.COMM_WORLD: run *target* on *inputs*; the exit status for this rank."""
    from mpi4py import MPI

    from pydra import target as targets
    from pydra._core.session import abort_on_uncaught_exceptions
    from pydra.executor import run

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exceptions(comm)  # from here on, no rank may leave the others waiting
    root = None
    spec = None
    if comm.rank == 0:
        try:
            spec = targets.read_target(target)
            root = targets.resolve(spec, targets.load_module(spec))
        except TargetError as exc:
            spec = exc  # tells the other ranks to stop too
            print(f"pydra: error: {exc}", file=sys.stderr)
    spec = comm.bcast(spec, root=0)
    if isinstance(spec, TargetError):
        return EXIT_USAGE
    problem = None
    if comm.rank != 0:
        try:
            targets.load_module(spec)
        except TargetError as exc:
            problem = str(exc)
    problems = comm.gather(problem, root=0)
    failed = comm.bcast([(rank, p) for rank, p in enumerate(problems or []) if p], root=0)
    if failed:
        if comm.rank == 0:
            for rank, text in failed:
                print(f"pydra: error: on rank {rank}: {text}", file=sys.stderr)
        return EXIT_USAGE

    started = time.monotonic()
    try:
        result = run(root, *inputs)
    except Exception as exc:
        report_failure(target, exc)
        return EXIT_FAILED
    if comm.rank != 0:
        return EXIT_OK
    elapsed = time.monotonic() - started
    if output is None:
        print(f"pydra: {target} finished in {elapsed:.2f} s on {comm.size} ranks: {summarise(result)}")
        return EXIT_OK
    try:
        write_json(result, Path(output))
    except (TypeError, ValueError, OSError) as exc:
        print(f"pydra: error: cannot write the result to {output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"pydra: {target} finished in {elapsed:.2f} s on {comm.size} ranks; result written to {output}")
    return EXIT_OK


def report_failure(target: str, exc: BaseException) -> None:
    """Print a task failure: the worker's traceback when there is one, then a one-line summary."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        print(cause.text.strip("\n"), file=sys.stderr)
    else:
        traceback.print_exception(exc, file=sys.stderr)
    notes = "; ".join(getattr(exc, "__notes__", []))
    where = f" ({notes})" if notes else ""
    print(f"pydra: {target} failed: {type(exc).__name__}: {exc}{where}", file=sys.stderr)


def summarise(result: Any, limit: int = 200) -> str:
    """A one-line description of a result, short enough for a terminal."""
    text = repr(result)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(result, (dict, list, tuple)):
        return f"{type(result).__name__} of {len(result)}: {text}"
    return text


def write_json(result: Any, path: Path) -> None:
    """Write *result* as JSON, atomically: a reader never sees half a file."""
    text = json.dumps(result, default=_json_default, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text + "\n")
    os.replace(handle.name, path)


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays are common results; anything else is the task's to convert.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"a result of type {type(value).__name__} has no JSON form")
