"""What a flood costs a legitimate user: ``pydra launch`` and ``pydra shell -c status``, unloaded and attacked.

    python benchmarks/floods.py              # 5 runs of each, per condition
    python benchmarks/floods.py --runs 3

Starts three agents on 127.0.0.2-4 and a ``pydra serve -n 4`` cluster (the test suite's
fixtures: tests/launcher/agentkit.py, tests/shell/clusterkit.py), then times, side by side in
one run: a launch across the three agents (``-n 4 examples/pipeline.py:pipeline 3``) and a
``pydra shell -c status``, with nobody attacking and then, right after, while tests/floodkit.py
runs a reconnecting slowloris; the same again for a handshake flood (each attack one process,
from an address of its own, at most 60 s, stopped by pid).  Prints the medians, their ratio,
what the attacker managed and how much the listeners logged meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "launcher"), str(ROOT / "tests" / "shell")]

from agentkit import HOSTS, Cluster  # noqa: E402
from clusterkit import serving  # noqa: E402
from floodkit import attacking, stop  # noqa: E402

ATTACK_SECONDS = 60  # the bound; each attack is stopped as soon as its runs are done


def timed(run) -> float | None:
    """Seconds *run* took, or None (and why, printed) if it failed."""
    started = time.perf_counter()
    done = run()
    if done.returncode != 0:
        print(f"FAILED (exit {done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-3000:]}", flush=True)
        return None
    return time.perf_counter() - started


def median(times: list[float | None]) -> float:
    return statistics.median(t for t in times if t is not None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command per condition")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "agents").mkdir()
        os.environ["PYDRA_HOME"] = str(root / "home")  # keep the benchmark's keys out of ~/.pydra
        agents = Cluster(root / "agents")
        try:
            with serving(root) as service:
                details = json.loads(service.connection_file.read_text())
                commands = {
                    "pydra launch (3 agents)": (
                        [f"{h}:{agents.ports[h]}" for h in HOSTS],
                        lambda: agents.launch("-n", "4", "--accept-new", "examples/pipeline.py:pipeline", "3"),
                        lambda: sum(len(agents.log(h).encode()) for h in HOSTS),
                    ),
                    "pydra shell -c status": (
                        [f"{details['address']}:{details['port']}"], lambda: service.shell("status"),
                        lambda: service.log.stat().st_size,
                    ),
                }
                print(f"load before: {os.getloadavg()[0]:.2f} (1 min average), {os.cpu_count()} cores")
                for name, (targets, run, log_bytes) in commands.items():
                    run()  # warm up: known_hosts written, caches filled
                    for kind in ("slowloris", "handshake"):
                        # The unloaded runs just before the attacked ones: the machine's other load drifts.
                        plain = [timed(run) for _ in range(args.runs)]
                        logged, started = log_bytes(), time.monotonic()
                        with attacking(kind, targets, ATTACK_SECONDS) as attack:
                            time.sleep(1.0)  # let it reach full speed
                            times = [timed(run) for _ in range(args.runs)]
                            running = attack.running()
                            stop(attack)
                        unloaded, attacked = median(plain), median(times)
                        failed = f"failed: {plain.count(None)} unloaded, {times.count(None)} attacked"
                        print(f"{name}: unloaded {unloaded:.2f} s, under {kind} {attacked:.2f} s: "
                              f"{attacked / unloaded:.2f}x (medians of {args.runs} runs; {failed}; attacked runs "
                              f"{', '.join('-' if t is None else f'{t:.2f}' for t in times)}; "
                              f"attack still running at the end: {running}; "
                              f"attacker: {attack.stats}; the listeners logged {log_bytes() - logged} bytes "
                              f"in {time.monotonic() - started:.0f} s)")
                print(f"load after: {os.getloadavg()[0]:.2f}")
        finally:
            agents.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
