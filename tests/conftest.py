"""Fixtures for the whole suite; the helpers themselves live in testkit.py (importable from any test)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_pydra_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the suite's keys and run directories out of the real ~/.pydra."""
    os.environ["PYDRA_HOME"] = str(tmp_path_factory.mktemp("pydra-home"))
