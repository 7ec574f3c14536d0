"""The ``cluster`` fixture: three agents on loopback hosts (see agentkit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkit import Cluster


@pytest.fixture
def cluster(tmp_path: Path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.stop()
