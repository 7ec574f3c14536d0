"""Matrix products on the workers: Pydra sharing the cores out (``PYDRA_THREADS=auto``) against the libraries' default.

    python benchmarks/threads.py                  # 3 ranks, 3 rounds of each, interleaved
    python benchmarks/threads.py -n 5 --rounds 5

Each run is a whole ``python -m pydra run -n N`` of :func:`Products`: a
Parallel of 24 items, each 5 products of a 800x800 float64 matrix with
itself (numpy, whose pip wheels multiply with OpenBLAS). The two variants
alternate so that the machine's load falls on both alike:

* ``auto`` (Pydra's default): every worker's numerical libraries may start
  as many threads as its share of the host's cores (``pydra/cpus.py``);
* ``off``: Pydra leaves them alone, and each worker's OpenBLAS starts a
  thread per core, as in any MPI job that does not set ``OMP_NUM_THREADS``.

It prints each variant's median time and their ratio; the results of every
run are checked equal (to a relative 1e-9: threads sum in another order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ITEMS, SIZE, PRODUCTS = 24, 800, 5


def products(seed: str) -> float:
    """One item (an INPUT, so a string): products of a seeded random matrix with itself, scaled to stay finite."""
    import numpy as np

    matrix = np.random.default_rng(int(seed)).standard_normal((SIZE, SIZE))
    for _ in range(PRODUCTS):
        matrix = matrix @ matrix
        matrix /= np.abs(matrix).max()
    return float(matrix.sum())


def Products():  # noqa: N802 (a TARGET factory, named as a task)
    import pydra

    return pydra.Parallel(products)


def timed(ranks: int, threads: str, output: Path) -> tuple[float, list[float]]:
    """Seconds one whole run takes, and its result; exits with the run's output if it fails."""
    env = dict(os.environ, PYDRA_THREADS=threads, PYDRA_PROGRESS="off")
    target = f"{Path(__file__).resolve()}:Products"
    argv = [sys.executable, "-m", "pydra", "run", "-n", str(ranks), "--no-journal", target,
            *map(str, range(ITEMS)), "--output", str(output)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return elapsed, json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3, help="ranks (rank 0 and N-1 workers)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved")
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name):
            raise SystemExit(f"{name} is set: both variants would use it; unset it to compare")
    times: dict[str, list[float]] = {"auto": [], "off": []}
    results: list[list[float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            for variant in times:
                seconds, result = timed(args.n, variant, Path(scratch) / "result.json")
                times[variant].append(seconds)
                results.append(result)
    # Threads sum in another order: the last bits may differ, nothing more.
    if not all(math.isclose(x, y, rel_tol=1e-9) for result in results for x, y in zip(result, results[0], strict=True)):
        raise SystemExit("the runs disagree")
    auto, off = (statistics.median(times[variant]) for variant in ("auto", "off"))
    print(f"pydra run -n {args.n}, {ITEMS} items of {PRODUCTS} products of {SIZE}x{SIZE} float64 matrices, "
          f"{os.cpu_count()} cores, medians of {args.rounds} whole runs each")
    print(f"  PYDRA_THREADS=auto (the default): {auto:6.2f} s   " + " ".join(f"{t:.2f}" for t in times["auto"]))
    print(f"  PYDRA_THREADS=off:                {off:6.2f} s   " + " ".join(f"{t:.2f}" for t in times["off"]))
    print(f"  off / auto: {off / auto:.2f}x; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
