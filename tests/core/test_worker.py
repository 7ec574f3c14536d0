"""What a worker rank reports of itself, in this process (pydra._core.worker; its serving loop runs in the mpiexec tests)."""

from __future__ import annotations

import subprocess
import sys
import threading

import mpi4py

# The pytest process is no MPI job: importing the worker must not initialise MPI here.
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

from pydra._core import worker  # noqa: E402

#: a task process: a fifth of a second of CPU, then three threads beside its main one, until its stdin closes
TASK_PROCESS = ("import sys, threading, time\n"
                "end = time.process_time() + 0.2\n"
                "while time.process_time() < end: pass\n"
                "release = threading.Event()\n"
                "pool = [threading.Thread(target=release.wait) for _ in range(3)]\n"
                "[thread.start() for thread in pool]\n"
                "print('ready', flush=True)\n"
                "sys.stdin.read()\n"
                "release.set()\n")


def test_usage_counts_every_thread_of_the_process_and_its_memory() -> None:
    before = worker._usage()
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        during = worker._usage()
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert during.threads == before.threads + 3 and before.threads >= 1
    assert during.rss > 0 and during.cpu >= before.cpu and during.when >= before.when


def test_usage_adds_the_task_process_while_it_runs_and_its_cpu_once_it_has_ended() -> None:
    with subprocess.Popen([sys.executable, "-c", TASK_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, start_new_session=True) as child:
        try:
            assert child.stdout.readline() == "ready\n"
            alone, with_child = worker._usage(), worker._usage([child.pid])
            assert with_child.threads == alone.threads + 4  # its main thread and its three
            assert with_child.rss > alone.rss
            assert with_child.cpu >= alone.cpu + 0.15  # its fifth of a second, in clock ticks
            child.stdin.close()
            assert child.wait(timeout=60) == 0
        finally:
            if child.poll() is None:
                child.kill()
    # Waited for: its seconds are this process's children's now, and its pid names nothing.
    after = worker._usage([child.pid])
    assert after.threads == alone.threads and after.cpu >= with_child.cpu
