"""Test hook, on PYTHONPATH only for tests/core/test_startup_losses.py: a rank that kills itself at once.

Python imports ``sitecustomize`` while it starts, long before MPI does. If
``FAULT_STEP`` is ``start`` and this process is rank ``FAULT_RANK`` of the
job, it dies by SIGKILL there: a rank lost before MPI's start-up completes.
Supervisors start without site (``-I -S``) and never get here.
"""

import os
import signal

RANK = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))  # MPICH's launcher, Open MPI's

if os.environ.get("FAULT_STEP") == "start" and RANK == os.environ.get("FAULT_RANK"):
    os.kill(os.getpid(), signal.SIGKILL)
