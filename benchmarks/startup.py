"""Start-up cost: ``pydra run -n 3`` of a trivial tree against a bare ``mpiexec -n 3``, side by side.

    python benchmarks/startup.py                  # 9 runs of each, interleaved
    python benchmarks/startup.py --runs 21        # more runs, steadier medians

Both commands are timed as whole processes, from fork to exit, alternately
so that the machine's load falls on both alike:

* the yardstick: ``mpiexec -n 3 python -c "from mpi4py import MPI;
  MPI.COMM_WORLD.Barrier()"`` (MPI's own start-up and shutdown);
* Pydra: ``python -m pydra run -n 3 tiny.py:Tiny a b c``, a Parallel of an
  identity function over three items, with its journal (in a scratch
  ``PYDRA_HOME``) as a user's run has one, and its ranks supervised.

It prints both medians (and the median CPU time of all the processes of a
run, which the machine's load does not inflate as much), their difference
and whether the difference meets the target (issue 12: at most 0.5 s). One
run of each comes first and is not counted (it warms the caches). Every
process may write its bytecode cache (``PYTHONDONTWRITEBYTECODE`` is
dropped), as an installed Pydra has one: without it each rank compiles
Pydra's modules from source.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANKS = 3
TARGET_SECONDS = 0.5
TASK_FILE = '''\
import pydra


def identity(x):
    return x


def Tiny():
    return pydra.Parallel(identity)
'''


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Seconds *argv* takes from start to exit, and the CPU seconds it and its descendants used.

    Exits with the command's output if it fails.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each command (default 9)")
    args = parser.parse_args()

    from pydra.launcher.mpiexec import find_mpiexec

    mpiexec = find_mpiexec()
    with tempfile.TemporaryDirectory(prefix="pydra-startup-") as scratch:
        Path(scratch, "tiny.py").write_text(TASK_FILE)
        env = dict(os.environ, PYDRA_HOME=str(Path(scratch, "home")), OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        commands = {
            "mpiexec": [mpiexec.path, "-n", str(RANKS), sys.executable, "-c",
                        "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
            "pydra": [sys.executable, "-m", "pydra", "run", "-n", str(RANKS), "tiny.py:Tiny", "a", "b", "c"],
        }
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for run in range(args.runs + 1):
            for name, argv in commands.items():
                elapsed, used = timed(argv, env, scratch)
                if run:  # the first run of each only warms the caches
                    seconds[name].append(elapsed)
                    cpu[name].append(used)
    bare, pydra = (statistics.median(seconds[name]) for name in commands)
    for name, values in seconds.items():
        print(f"{name:>8}: median {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f}); "
              f"CPU {statistics.median(cpu[name]):.3f} s")
    cost = pydra - bare
    print(f"\n{mpiexec.implementation}, {RANKS} ranks on {os.cpu_count()} cores, {args.runs} runs of each, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"pydra run -n {RANKS} - bare mpiexec = {cost:.3f} s  (target <= {TARGET_SECONDS}: "
          f"{'met' if cost <= TARGET_SECONDS else 'not met'})")


if __name__ == "__main__":
    main()
