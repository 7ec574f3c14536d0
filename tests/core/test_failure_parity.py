"""A one-process ``pydra run`` reports every failure as ``pydra run -n 3`` does.

Proves, for a task raising, a task calling ``sys.exit``, a task raising
KeyboardInterrupt, a map item failing after its retries, a bad TARGET, a
gang larger than the job and a result that cannot be pickled: the same exit
status and the same stderr in both (ranks and host names aside): the failing
rank's traceback headed "Worker r of n on host" and starting at the user's
frame, then one summary line; or the summary line alone when no frame is the
user's. No pydra-internal frame is ever shown.
"""

from __future__ import annotations

import re
import sys

import pytest
from mpijobs import Finished, run_process

TARGETS = "tests/core/jobs/failure_targets.py"


def pydra_run(ranks: int, target: str, run_dir) -> Finished:
    """``pydra run TARGET 1 2 3``, in one process (*ranks* 1) or as ``pydra run -n ranks``."""
    launch = [] if ranks == 1 else ["-n", str(ranks)]
    argv = [sys.executable, "-m", "pydra", "run", *launch, "--run-dir", str(run_dir), f"{TARGETS}:{target}", "1", "2", "3"]
    return run_process(argv, timeout=120)


def shape(finished: Finished) -> list[str]:
    """What the user sees on stderr, with ranks, sizes and hosts made alike (and the run directory line dropped)."""
    lines = []
    for line in finished.stderr.splitlines():
        if not line.strip() or line.startswith("pydra: run directory "):
            continue
        line = re.sub(r"^Worker \d+ of \d+ on \S+$", "Worker R of N on HOST", line)
        lines.append(re.sub(r"last on rank \d+", "last on rank R", line))
    return lines


@pytest.fixture
def both_ways(tmp_path):
    """Run a target in one process and with ``pydra run -n 3``; the two outcomes."""

    def run(target: str) -> tuple[Finished, Finished]:
        return pydra_run(1, target, tmp_path / "one"), pydra_run(3, target, tmp_path / "three")

    return run


def assert_no_pydra_frames(finished: Finished) -> None:
    assert "/pydra/" not in finished.stderr and "internal error" not in finished.stderr, finished.stderr
    assert "MPI_Abort" not in finished.stderr and "Abort(" not in finished.stderr, finished.stderr


@pytest.mark.parametrize(
    "target, raised",
    [
        ("Raises", "ValueError: user text from Raises"),
        ("Exits", "RuntimeError: the task raised SystemExit(3)"),
        ("Interrupts", "RuntimeError: the task raised KeyboardInterrupt()"),
        ("retried_items", "ValueError: user text for item 2"),
    ],
)
def test_a_task_failure_is_the_users_traceback_and_one_line_both_ways(both_ways, target: str, raised: str) -> None:
    one, three = both_ways(target)
    assert one.returncode == three.returncode == 1, (one.stderr, three.stderr)
    assert shape(one) == shape(three), (one.stderr, three.stderr)
    lines = shape(one)
    assert lines[0] == "Worker R of N on HOST" and lines[1] == "Traceback (most recent call last):", one.stderr
    assert "failure_targets.py" in lines[2], one.stderr  # the user's frame comes first
    assert lines[-1].startswith(f"pydra: {TARGETS}:{target} failed: {raised}"), lines[-1]
    for finished in (one, three):
        assert_no_pydra_frames(finished)


@pytest.mark.parametrize(
    "target, line",
    [
        ("TooBigGang", "failed: ValueError: the gang needs 5 worker ranks; this job has "),
        ("LockResult", "failed: TypeError: cannot pickle '_thread.lock' object"),
    ],
)
def test_a_failure_in_no_frame_of_the_users_is_one_line_both_ways(both_ways, target: str, line: str) -> None:
    one, three = both_ways(target)
    for finished in (one, three):
        assert finished.returncode == 1, finished.stderr
        lines = shape(finished)
        assert len(lines) == 1 and lines[0].startswith(f"pydra: {TARGETS}:{target} {line}"), finished.stderr
        assert_no_pydra_frames(finished)


def test_a_bad_target_is_one_line_both_ways(both_ways) -> None:
    one, three = both_ways("NoSuchTask")
    assert one.returncode == three.returncode == 2
    assert shape(one) == shape(three) == [f"pydra: error: task file {TARGETS} has no attribute 'NoSuchTask'"], three.stderr
