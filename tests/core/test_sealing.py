"""Sealed jobs end to end, under real mpiexec: forgeries are dropped, real work is unchanged.

Proves: with ``PYDRA_JOB_KEY`` set, rank 0 drops (and logs with the source
rank and tag) what a worker's task sends it behind Pydra's back: a raw
pickle (never unpickled: its marker file is not created, though it is
without a key), an altered sealed reply, a replay of a genuine reply
recorded off the wire, a replayed log record and a log record passed off as
a reply; the job still gives the right answer. So does one whose messages
carry out-of-band parts (a large array), when a part is altered, taken from
another message, of another size than its sealed header names, or replayed
with its header: never unpickled either. A sealed job gives the same
results as the serial computation for a Parallel, a MapReduce (the shuffle)
and a GangTask, under ``mpiexec``, under ``PYDRA_SEAL=1 pydra run -n 3``
(which makes the key) and with ``--isolate``; its workers seal and no longer
hold the key in their environment. ``PYDRA_SEAL=1`` without a key, and ranks
with different keys, stop the job at start-up with one error line.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from pathlib import Path

import pytest
from mpijobs import mpi_environment, run_process, run_pydra

TARGETS = "tests/core/jobs/sealed_targets.py"


def keyed_environment(**extra: str) -> dict[str, str]:
    return dict(mpi_environment(), PYDRA_JOB_KEY=secrets.token_hex(32), **extra)


@pytest.mark.smoke
def test_forged_altered_and_replayed_messages_are_dropped(tmp_path: Path) -> None:
    marker, out = tmp_path / "unpickled-a-forgery", tmp_path / "result.json"
    finished = run_pydra(
        3, ["run", f"{TARGETS}:forgeries", str(marker), "--output", str(out), "--no-journal"], env=keyed_environment()
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(out.read_text()) == [i * i for i in range(20)]
    assert not marker.exists(), "rank 0 unpickled a message that was not sealed"
    dropped = re.findall(r"pydra: rank 0 dropped a message from rank (\d), tag (\d+) \(\w+\): (does not authenticate|replayed)", finished.stderr)
    for worker in ("1", "2"):
        mine = [(tag, why) for rank, tag, why in dropped if rank == worker]
        # raw pickle, altered reply, log record sent as a reply; a replayed reply; a replayed log record
        assert sorted(mine) == sorted([("12", "does not authenticate")] * 3 + [("12", "replayed"), ("16", "replayed")]), finished.stderr
    assert "it was not unpickled" in finished.stderr


def test_forged_altered_swapped_and_replayed_parts_are_dropped(tmp_path: Path) -> None:
    """Messages with out-of-band buffers: a part that is not exactly the one its sealed header names is refused."""
    marker, out = tmp_path / "unpickled-a-forgery", tmp_path / "result.json"
    finished = run_pydra(
        3, ["run", f"{TARGETS}:part_forgeries", str(marker), "--output", str(out), "--no-journal"],
        env=keyed_environment(),
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(out.read_text()) == [i * i for i in range(20)]
    assert not marker.exists(), "rank 0 unpickled a message whose part was forged"
    line = r"pydra: rank 0 dropped a message from rank (\d), tag 12 \(replies\): (.*?); it was not"
    dropped = re.findall(line, finished.stderr)
    part = "a part does not authenticate: forged, altered, or not the part its message names"
    forged = sorted([part, part, "a part of 262166 bytes where its message named 262160"])
    replay = "replayed: its counter is not above the last one opened from that rank and tag"
    no_open = "does not authenticate: forged, altered, or sent to another rank or with another tag"
    mine = {worker: sorted(why for rank, why in dropped if rank == worker) for worker in ("1", "2")}
    # Both workers forge; the one that sent Large's reply (gang rank 0) also replays it: its header is refused
    # as a replay, then its part, taken for a message of its own, is refused too. A part has no counter of
    # its own on the wire, so rank 0 reads its first 8 bytes of ciphertext as one: about one time in ten
    # (time_ns() / 2**64) they come out below the last counter seen, and it is refused as a replay, not
    # opened. Either way it is dropped unopened.
    replayed = [sorted(forged + [replay, why]) for why in (no_open, replay)]
    assert sorted(mine.values()) in ([forged, replayed[0]], [forged, replayed[1]]), finished.stderr


def test_without_a_key_the_forgery_would_have_run(tmp_path: Path) -> None:
    """The control: the same job unsealed lets the raw pickle create its marker (and then break rank 0)."""
    marker = tmp_path / "unpickled-a-forgery"
    env = {k: v for k, v in mpi_environment().items() if k not in ("PYDRA_JOB_KEY", "PYDRA_SEAL")}
    run_pydra(3, ["run", f"{TARGETS}:forgeries", str(marker), "--no-journal"], env=env)
    assert marker.exists()


def serial_workloads(items: range) -> dict:
    squares = [x * x for x in items]
    buckets = {key: sorted(x for x in squares if x % 7 == key) for key in sorted({x % 7 for x in squares})}
    return {"buckets": {str(k): v for k, v in buckets.items()}, "total": sum(squares), "gang": 2}


MODES = [
    pytest.param("mpiexec", id="mpiexec-3-key", marks=pytest.mark.smoke),
    pytest.param("self-launch", id="PYDRA_SEAL-run-n-3"),
    pytest.param("isolate", id="PYDRA_SEAL-run-n-3-isolate"),
]


def sealed_run(mode: str, args: list[str]) -> object:
    if mode == "mpiexec":
        finished = run_pydra(3, ["run", *args], env=keyed_environment())
    else:
        env = dict(mpi_environment(), PYDRA_SEAL="1")
        env.pop("PYDRA_JOB_KEY", None)
        isolate = ["--isolate"] if mode == "isolate" else []
        finished = run_process([sys.executable, "-m", "pydra", "run", "-n", "3", *isolate, *args], env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "dropped" not in finished.stderr, finished.stderr[-3000:]
    return finished


@pytest.mark.parametrize("mode", MODES)
def test_sealed_parallel_mapreduce_and_gang(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    items = range(60)
    sealed_run(mode, [f"{TARGETS}:workloads", *map(str, items), "--output", str(out), "--no-journal"])
    assert json.loads(out.read_text()) == serial_workloads(items)


@pytest.mark.parametrize("mode", MODES[:2])
def test_workers_seal_and_forget_the_key(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    sealed_run(mode, [f"{TARGETS}:probes", *map(str, range(8)), "--output", str(out), "--no-journal"])
    probes = json.loads(out.read_text())
    assert {probe["rank"] for probe in probes} <= {1, 2}
    assert all(probe["sealed"] and not probe["key_in_env"] for probe in probes), probes


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pydra: error:")]


def test_seal_without_a_key_stops_at_start_up() -> None:
    env = dict(mpi_environment(), PYDRA_SEAL="1")
    env.pop("PYDRA_JOB_KEY", None)
    finished = run_pydra(3, ["run", f"{TARGETS}:probes", "a", "--no-journal"], env=env)
    assert finished.returncode == 2
    assert error_lines(finished.stderr) == [
        "pydra: error: PYDRA_SEAL=1 needs PYDRA_JOB_KEY, the same on every rank: "
        "export PYDRA_JOB_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')"
    ], finished.stderr


def test_ranks_with_different_keys_stop_at_start_up() -> None:
    from pydra.launcher.mpiexec import find_mpiexec

    program = [sys.executable, "-m", "pydra", "run", f"{TARGETS}:probes", "a", "--no-journal"]
    argv = [find_mpiexec().path, "-n", "1", "env", f"PYDRA_JOB_KEY={secrets.token_hex(32)}", *program,
            ":", "-n", "2", "env", f"PYDRA_JOB_KEY={secrets.token_hex(32)}", *program]
    finished = run_process(argv, env=mpi_environment())
    assert finished.returncode == 2
    assert error_lines(finished.stderr) == [
        "pydra: error: the ranks do not share one PYDRA_JOB_KEY: every rank needs the same key"
    ], finished.stderr
