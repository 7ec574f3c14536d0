"""Word count: Pydra's MapReduce against a serial Counter and multiprocessing.Pool(2), side by side.

    python benchmarks/wordcount.py                 # 24 files, ~4.8 M words, ~36 MB
    python benchmarks/wordcount.py --scale 0.1     # a tenth of the words, quicker
    python benchmarks/wordcount.py --repeat 5      # best of 5 runs of each (default 3), interleaved
    python benchmarks/wordcount.py --profile       # also cProfile worker 1 of the 3-rank run

The corpus is generated (seeded, Zipf-distributed words, some capitalised and
punctuated) into a temporary directory. Every variant counts the same files
with the tokenizer of ``examples/wordcount.py`` (``[a-z']+`` of each
lowercased line):

* serial: one ``collections.Counter`` updated line by line, in this process;
* pool: ``multiprocessing.Pool(2)`` mapping a Counter per file, then summed
  (the pool's start-up is included: it is part of using it);
* pydra-1 and pydra-3: ``pydra.run`` of ``examples/wordcount.py:WordCount``
  (its ``map`` yields one ``(word, 1)`` pair per word) in an
  ``mpiexec -n 1`` and an ``mpiexec -n 3`` job (rank 0 schedules, 2 workers).
  The time is that of the ``pydra.run`` call (Pydra imported already); the
  whole process, MPI and Python start-up and imports included, is printed
  beside it. The job's processes may write their bytecode cache
  (``PYTHONDONTWRITEBYTECODE`` is dropped), as an installed Pydra has one:
  without it every rank compiles the modules ``pydra.run`` loads on its
  first call from source, inside the timed call, on every run.

All four results must be equal, or the benchmark fails. Two more variants
show where the limit is, with no MPI and no scheduling:

* pairs-1: Pydra's map path alone, in this process: the example's ``map``
  (a generator of pairs) into the running totals of a
  :class:`~pydra.tasks.mapreduce.MapBuffer`, over every file;
* pairs-2: the same with the files split between two forked processes that
  run at once, timed from the fork to the end of both: the most two workers
  running this ``map`` can do on this machine. ``serial / pairs-2`` is the
  ceiling of ``serial / pydra-3`` here.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
EXAMPLE = HERE.parent.parent / "examples" / "wordcount.py"
FILES, WORDS, SEED = 24, 4_800_000, 20261206
WORD = re.compile(r"[a-z']+")  # the tokenizer of examples/wordcount.py
VARIANTS = ("serial", "pool", "pydra-1", "pydra-3", "pairs-1", "pairs-2")


def make_corpus(directory: Path, scale: float) -> list[Path]:
    """Write FILES text files of ~WORDS * scale words in all; return their paths."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1.0 / np.arange(1, len(letters) + 1)
    lengths = rng.integers(3, 11, size=60_000)
    vocabulary = ["".join(rng.choice(letters, size=n, p=weights / weights.sum())) for n in lengths]
    vocabulary = sorted(set(vocabulary))
    # Some variants the tokenizer must fold or split: "The", "word,", "don't".
    decorated = [w.capitalize() if i % 7 == 0 else w + "," if i % 11 == 0 else w for i, w in enumerate(vocabulary)]
    decorated = np.array(decorated + [w + "'s" for w in vocabulary[:500]], dtype=object)
    per_file = max(1, int(WORDS * scale) // FILES)
    paths = []
    for index in range(FILES):
        ranks = rng.zipf(1.2, size=per_file)
        words = decorated[(ranks - 1) % len(decorated)]
        lines = [" ".join(words[start : start + 12]) for start in range(0, per_file, 12)]
        path = directory / f"part-{index:02d}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def count_into(counts: collections.Counter, path: Path) -> collections.Counter:
    """Add the words of one file to *counts*, the plain way; return *counts*."""
    with open(path, encoding="utf-8") as text:
        for line in text:
            counts.update(WORD.findall(line.lower()))
    return counts


def count_file(path: Path) -> collections.Counter:
    return count_into(collections.Counter(), path)


def serial(paths: list[Path]) -> tuple[float, dict]:
    started = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    for path in paths:
        count_into(counts, path)
    return time.perf_counter() - started, dict(counts)


def pool(paths: list[Path]) -> tuple[float, dict]:
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as workers:
        counts: collections.Counter = collections.Counter()
        for part in workers.imap_unordered(count_file, paths):
            counts.update(part)
    return time.perf_counter() - started, dict(counts)


def _mapped(paths: list[Path]) -> dict:
    """The running totals of Pydra's map path over *paths*, in this process."""
    from pydra.tasks.mapreduce import MapBuffer

    buffer = MapBuffer(_example_job())
    buffer.add([str(path) for path in paths])
    return buffer.values


def _example_job():
    from pydra import target as targets

    spec = targets.read_target(f"{EXAMPLE}:WordCount")
    return targets.resolve(spec, targets.load_module(spec))


def pairs_alone(paths: list[Path]) -> tuple[float, dict]:
    started = time.perf_counter()
    counts = _mapped(paths)
    return time.perf_counter() - started, counts


def pairs_in_two(paths: list[Path]) -> tuple[float, dict]:
    """Each half of the files mapped in a forked process, both at once, and its totals sent back; added up untimed."""
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as workers:
        pending = [workers.apply_async(_mapped, (half,)) for half in (paths[0::2], paths[1::2])]
        for part in pending:
            part.wait()
        elapsed = time.perf_counter() - started
        counts: collections.Counter = collections.Counter()
        for part in pending:
            counts.update(part.get())
    return elapsed, dict(counts)


def pydra_variant(paths: list[str], output: str, profile: str | None) -> None:
    """Inside the MPI job: run the example's WordCount; rank 0 writes the counts and prints the time."""
    import pydra

    job = _example_job()  # every rank loads it: same module name everywhere
    run = pydra.run  # imported before the clock starts: importing Pydra is start-up (the whole-process figure)
    profiler = None
    if profile:
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == min(1, MPI.COMM_WORLD.size - 1):
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
    started = time.perf_counter()
    counts = run(job, *paths)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    if counts is not None:
        Path(output).write_bytes(pickle.dumps(counts))
        print(json.dumps({"seconds": elapsed}), flush=True)


def run_pydra(mpiexec, ranks: int, paths: list[Path], work: Path, profile: bool) -> tuple[float, float, dict]:
    """(pydra.run seconds, whole-process seconds, counts) of an ``mpiexec -n ranks`` job."""
    output = work / f"pydra-{ranks}.pickle"
    program = [sys.executable, str(HERE), "--variant", "pydra", "--output", str(output)]
    if profile:
        program += ["--profile", str(work / f"rank1-of-{ranks}.prof")]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as an installed Pydra, whose modules are compiled once, not per run
    started = time.perf_counter()
    done = subprocess.run(mpiexec.command(ranks, program + [str(p) for p in paths]), capture_output=True, text=True,
                          env=env, timeout=900)
    whole = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"pydra on {ranks} ranks failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    if profile:
        import pstats

        print(f"\n--- cProfile of rank {min(1, ranks - 1)} in the {ranks}-rank run ---")
        pstats.Stats(str(work / f"rank1-of-{ranks}.prof")).sort_stats("cumulative").print_stats(25)
    return json.loads(lines[-1])["seconds"], whole, pickle.loads(output.read_bytes())


def drive(scale: float, repeat: int, profile: bool) -> None:
    from pydra.launcher.mpiexec import find_mpiexec

    mpiexec = find_mpiexec()
    with tempfile.TemporaryDirectory(prefix="pydra-wordcount-") as tmp:
        work = Path(tmp)
        paths = make_corpus(work, scale)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        wholes: dict[str, list[float]] = {"pydra-1": [], "pydra-3": []}
        results: dict[str, dict] = {}
        for _ in range(repeat):  # interleaved, so that a burst of load from elsewhere hits every variant alike
            for name, variant in (("serial", serial), ("pool", pool), ("pairs-1", pairs_alone),
                                  ("pairs-2", pairs_in_two)):
                elapsed, results[name] = variant(paths)
                times[name].append(elapsed)
            for ranks in (1, 3):
                name = f"pydra-{ranks}"
                elapsed, whole, results[name] = run_pydra(mpiexec, ranks, paths, work, profile)
                times[name].append(elapsed)
                wholes[name].append(whole)
    seconds = {name: min(values) for name, values in times.items()}  # the least disturbed run of each
    whole = {name: min(values) for name, values in wholes.items()}
    reference = results["serial"]
    for name, counts in results.items():
        if counts != reference:
            wrong = [k for k in reference.keys() | counts.keys() if counts.get(k) != reference.get(k)]
            sys.exit(f"{name} disagrees with the serial Counter on {len(wrong)} words, e.g. {wrong[:5]}")
    words = sum(reference.values())
    print(f"corpus: {len(paths)} files, {words:,} words ({len(reference):,} distinct), {megabytes:.1f} MB; "
          f"all {len(VARIANTS)} results equal")
    print(f"best of {repeat} interleaved runs each (all: seconds in run order)")
    for name in VARIANTS:
        extra = f"   whole process {whole[name]:5.2f} s" if name in whole else " " * 24
        print(f"{name:>8}: {seconds[name]:6.2f} s{extra}   ({', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"\n{mpiexec.implementation}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    speedup, versus_pool = seconds["serial"] / seconds["pydra-3"], seconds["pool"] / seconds["pydra-3"]
    print(f"serial / pydra-3 = {speedup:5.2f}x  (target >= 1.5: {'met' if speedup >= 1.5 else 'NOT met'})")
    print(f"pool   / pydra-3 = {versus_pool:5.2f}x  (target >= 1.0: {'met' if versus_pool >= 1.0 else 'NOT met'})")
    print(f"serial / pydra-1 = {seconds['serial'] / seconds['pydra-1']:5.2f}x  (one rank: no workers, no target)")
    print(f"serial / pairs-2 = {seconds['serial'] / seconds['pairs-2']:5.2f}x  (the ceiling of serial / pydra-3 here: "
          f"the map alone, in two processes, no MPI); pydra-3 runs at {seconds['pairs-2'] / seconds['pydra-3']:.0%} "
          f"of pairs-2's speed")
    print(f"pairs-1 / serial = {seconds['pairs-1'] / seconds['serial']:5.2f}x  (the map's pairs and running totals "
          f"against the serial Counter's work, one process)")
    outside = statistics.median(w - t for w, t in zip(wholes["pydra-3"], times["pydra-3"]))
    print(f"pydra-3 whole process {whole['pydra-3']:.2f} s; outside pydra.run (MPI and Python start-up, imports, "
          f"exit) {outside:.2f} s, the median over its runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of words by this")
    parser.add_argument("--repeat", type=int, default=3, help="run every variant this many times; report the best")
    parser.add_argument("--profile", nargs="?", const="", default=None,
                        help="print a cProfile of worker 1 (rank 0 with one rank) for each Pydra run")
    parser.add_argument("--variant", choices=["pydra"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is None:
        drive(args.scale, args.repeat, args.profile is not None)
    else:
        pydra_variant(args.paths, args.output, args.profile)


if __name__ == "__main__":
    main()
