"""The shell tests' cluster: one ``pydra serve -n 4 --max-jobs 1`` per test module that asks for it."""

from __future__ import annotations

from typing import Iterator

import pytest
from clusterkit import Cluster, serving


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The module's cluster."""
    with serving(tmp_path_factory.mktemp("service")) as running:
        yield running
