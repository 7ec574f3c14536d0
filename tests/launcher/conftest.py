"""The ``cluster`` fixture: three agents on loopback hosts (see agentkit.py); Open MPI's leftovers removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkit import Cluster, remove_session_directories, session_directories

#: session directories there before these tests: not theirs to remove
_FOUND = session_directories()


@pytest.fixture
def cluster(tmp_path: Path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def no_session_directory_left() -> None:
    """Open MPI's prted killed outright (a host that dies, a job that a rank's death ends) leaves its session
    directory: remove those the tests left, once their daemons are gone (their pids come back, and a prted given one
    fails to start). Before and after each test: a daemon may still be dying when its test ends."""
    remove_session_directories(_left())
    yield
    remove_session_directories(_left())


def _left() -> set[int]:
    return {int(path.name.partition(".")[2]) for path in session_directories() - _FOUND
            if path.name.partition(".")[2].isdigit()}
