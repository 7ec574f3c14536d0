"""What journaling costs: ``pydra run`` with and without a journal, side by side.

    python benchmarks/journal.py                # 3 ranks (2 workers), both batch modes
    python benchmarks/journal.py --scale 0.2    # fewer items, quicker

Each variant is one ``pydra run -n 3 benchmarks/journal.py:<tree> --no-journal``
or ``--run-dir DIR`` of tiny tasks; the time is the one ``pydra run``
reports for the tree (MPI start-up excluded). ``chunksize=1`` is the worst
case, one journal row per item; with adaptive batching a row holds a batch.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pydra

HERE = Path(__file__).resolve()
ITEMS = {"one-per-unit": 100_000, "auto-batched": 5_000_000}


def inc(x: int) -> int:
    return x + 1


def one_per_unit() -> pydra.Task:
    return pydra.Parallel(inc, range(int(os.environ["BENCH_ITEMS"])), chunksize=1)


def auto_batched() -> pydra.Task:
    return pydra.Parallel(inc, range(int(os.environ["BENCH_ITEMS"])))


def seconds_of(tree: str, items: int, journal: bool) -> float:
    """Run *tree* over *items* with or without a journal; the seconds ``pydra run`` reports."""
    with tempfile.TemporaryDirectory() as scratch:
        flags = ["--run-dir", str(Path(scratch) / "run")] if journal else ["--no-journal"]
        target = f"{HERE}:{tree.replace('-', '_')}"
        env = dict(os.environ, BENCH_ITEMS=str(items), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        done = subprocess.run(
            [sys.executable, "-m", "pydra", "run", "-n", "3", target, "-o", str(Path(scratch) / "out.json"), *flags],
            capture_output=True, text=True, env=env, timeout=900,
        )
        found = re.search(r"finished in ([0-9.]+) s", done.stdout)
        if done.returncode != 0 or not found:
            sys.exit(f"{tree} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every item count by this")
    args = parser.parse_args()
    for tree, items in ITEMS.items():
        items = max(1000, int(items * args.scale))
        off = seconds_of(tree, items, journal=False)
        on = seconds_of(tree, items, journal=True)
        print(
            f"{tree:>13}: {items:>9,} items  no journal {items / off:>11,.0f}/s  "
            f"journal {items / on:>11,.0f}/s  = {off / on:5.2f}x of the speed"
        )


if __name__ == "__main__":
    main()
