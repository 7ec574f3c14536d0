"""An uncaught exception on one rank must end the whole MPI job: see tests/core/test_executor.py.

    mpiexec -n 3 python tests/core/jobs/job_abort.py MODE [MARKER]

Rank 0 prints ``SESSION DONE`` after its first session; the job must then
end non-zero (it must not hang) because of what MODE does, except for
``task_thread_raises``: a thread's uncaught exception is printed and the
job goes on, as in any Python program. ``scheduler_fails`` and
``caller_drive_fails`` inject a fault into rank 0's scheduler: the job must
abort, saying so, rather than hang.
"""

from __future__ import annotations

import sys
import threading
import time

from mpi4py import MPI

import pydra

COMM = MPI.COMM_WORLD
MODE = sys.argv[1]
ACTOR = 2 if COMM.size > 2 else COMM.size - 1  # the rank that misbehaves


def task_keyboard_interrupt(x):
    raise KeyboardInterrupt(f"interrupted in a task on item {x}")


def task_thread_raises(x):
    def crash():
        raise RuntimeError(f"a task's thread crashed on item {x}")

    thread = threading.Thread(target=crash)
    thread.start()
    thread.join()
    time.sleep(5)  # the abort ends this sleep
    return x


def task_sys_exit(x):
    sys.exit(f"a task called sys.exit on item {x}")


def inject_scheduler_fault(mode: str) -> None:
    """A fault in rank 0's scheduler: in sending a call's command (whichever thread sends it), or in a driven pass."""
    from pydra._core import master, transport

    if mode == "scheduler_fails":
        send = transport.MpiTransport.send

        def failing_send(self, master, rank, commands):
            if any(command[0] == "call" and command[3] == ("fault",) for command in commands):
                raise RuntimeError("an injected fault in the scheduler")
            return send(self, master, rank, commands)

        transport.MpiTransport.send = failing_send
    else:
        def failing_drive(self, done, end):
            raise RuntimeError("an injected fault in a pass run by a waiting caller")

        master.Master._drive = failing_drive


def main() -> None:
    tasks = {
        "task_keyboard_interrupt": task_keyboard_interrupt,
        "task_thread_raises": task_thread_raises,
        "task_sys_exit": task_sys_exit,
    }
    with pydra.Executor() as ex:
        if ex is not None:
            if MODE in tasks:
                print("RESULT", list(ex.map(tasks[MODE], [1])), flush=True)
            elif MODE in ("scheduler_fails", "caller_drive_fails"):
                inject_scheduler_fault(MODE)
                # (a waiting caller drives only while the scheduler thread sleeps: most calls, not all)
                print("RESULT", [ex.submit(len, "fault").result() for _ in range(1000)][-1], flush=True)
            else:
                assert sum(ex.map(abs, range(-10, 10))) == 100
            if MODE == "rank0_inside_block":
                raise RuntimeError("rank 0 raised inside its with block")
        elif MODE == "worker_after_session" and COMM.rank == ACTOR:
            raise RuntimeError(f"rank {COMM.rank} raised in its own code after serving")
    if COMM.rank == 0:
        print("SESSION DONE", flush=True)
    if MODE == "after_block" and COMM.rank == ACTOR:
        raise RuntimeError(f"rank {COMM.rank} raised after the executor block")
    if MODE == "between_sessions" and COMM.rank == ACTOR:
        time.sleep(0.5)
        raise RuntimeError(f"rank {COMM.rank} raised between two sessions")
    # a second session (or any collective) that the misbehaving rank never joins
    with pydra.Executor() as ex:
        if ex is not None:
            assert list(ex.map(abs, [-1])) == [1]
    COMM.Barrier()
    if COMM.rank == 0:
        print("RESULT finished normally", flush=True)


main()
