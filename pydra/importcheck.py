"""A service's first import of a job's TARGET, in a child process with a time limit.

Rank 0 of ``pydra serve`` imports a job's task file (or module) to walk its
tree, in the process that holds the control plane and every other job. A
file that calls ``os._exit`` or crashes at import would end the cluster,
and one that takes minutes would hold the service's lock meanwhile. So the
service first has a child process import the target and build its task
(:func:`check_in_child`, rank 0's side; :func:`child_check`, the child's,
``python -m pydra.importcheck``), and imports it itself only if that
worked within ``PYDRA_IMPORT_TIMEOUT`` seconds.

The child never joins the MPI job: it starts without the launcher's
variables, with mpi4py told not to initialise MPI, in a session of its own
(MPICH's launcher signals a rank's process group), and it is killed with
everything it started once its time is up.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys

from pydra import target as targets
from pydra.errors import TargetError

#: the child's exit status when the target failed in a way it could put into words (on its pipe)
_EXPLAINED = 3


def check_in_child(spec: targets.TargetSpec, timeout: float) -> None:
    """Import *spec* and build its task in a child process; TargetError in one line if that fails or takes too long."""
    # Here, not above: the isolation module loads mpi4py.MPI, which the child must not initialise.
    from pydra._core.isolation import child_environment, describe_status

    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "pydra.importcheck", str(write_fd)]
    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 pass_fds=(write_fd,), env=child_environment(), start_new_session=True)
    except OSError as exc:
        os.close(read_fd)
        raise TargetError(f"cannot start a process to import {_where(spec)}: {exc}") from None
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        try:
            child.communicate(pickle.dumps(spec), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TargetError(f"{_where(spec)} took more than {timeout:g} s to import (PYDRA_IMPORT_TIMEOUT)") from None
        finally:
            # It, and whatever its import started (its session is its own; the group's number stays taken while
            # any member lives, so it names no one else).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        # What it said is in the pipe already; a process the import forked may hold the other end open still.
        os.set_blocking(read_fd, False)
        try:
            said = (pipe.read() or b"").decode(errors="replace")
        except BlockingIOError:
            said = ""
    if child.returncode == _EXPLAINED and said:
        raise TargetError(said)
    if child.returncode != 0:
        hint = " (os._exit at import?)" if child.returncode > 0 else ""
        raise TargetError(f"{_where(spec)} ended the process importing it: it {describe_status(child.returncode)}{hint}")


def child_check(result_fd: int) -> int:
    """The child's side: import the pickled spec on stdin, build its task, and say what failed on *result_fd*."""
    spec = pickle.loads(sys.stdin.buffer.read())
    try:
        targets.resolve(spec, targets.load_module(spec))
    except TargetError as exc:
        os.write(result_fd, str(exc).encode())
        return _EXPLAINED
    except Exception as exc:  # noqa: BLE001 - e.g. TypeError from importing "..x": said as rank 0 would say it
        os.write(result_fd, f"cannot load {spec.text}: {type(exc).__name__}: {exc}".encode())
        return _EXPLAINED
    return 0


def _where(spec: targets.TargetSpec) -> str:
    return f"task file {spec.path}" if spec.path else f"module {spec.module}"


if __name__ == "__main__":
    import mpi4py

    mpi4py.rc.initialize = False  # a target that imports mpi4py.MPI must not join (or start) an MPI job here
    sys.exit(child_check(int(sys.argv[1])))
