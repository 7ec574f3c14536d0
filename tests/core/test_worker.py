"""What a worker rank reports of itself, in this process (pydra._core.worker; its serving loop runs in the mpiexec tests)."""

from __future__ import annotations

import threading

import mpi4py

# The pytest process is no MPI job: importing the worker must not initialise MPI here.
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

from pydra._core import worker  # noqa: E402


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
