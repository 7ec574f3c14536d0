"""TARGET for tests/test_cpus.py: what each item's rank tells numerical libraries, and what OpenBLAS does with it.

Each item returns the rank's :data:`pydra.cpus.VARIABLES`, the number of
threads a fresh Python with this rank's environment has once it has imported
numpy (OpenBLAS starts the others as it loads, never more than the CPUs it
may run on), and the number of those CPUs.
"""

import os
import subprocess
import sys

import pydra
from pydra import cpus

PROBE = "import os, numpy; print(len(os.listdir('/proc/self/task')))"


def report(_item: str) -> dict:
    told = {name: os.environ.get(name) for name in cpus.VARIABLES}
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    return {"told": told, "threads": int(probe.stdout), "cpus": len(os.sched_getaffinity(0))}


def Report():
    return pydra.Parallel(report)
