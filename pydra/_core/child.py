"""Entry point of an isolated worker's child process: ``python -m pydra._core.child``.

See :mod:`pydra._core.isolation`. This stub exists so that mpi4py is told not
to initialise MPI before anything imports ``mpi4py.MPI``: the child runs task
code only and must never join the MPI job.
"""

import sys

import mpi4py

mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

from pydra._core.isolation import serve_child  # noqa: E402  (after the rc settings above)

if __name__ == "__main__":
    read_fd, write_fd, rank, size = map(int, sys.argv[1:5])
    serve_child(read_fd, write_fd, rank, size, sys.argv[5])
