"""The systemd unit of ``pydra node --system`` (deploy/systemd/pydra-node.service) passes ``systemd-analyze verify``.

The unit names /usr/local/bin/pydra; the test points it at this venv's pydra,
which systemd checks exists and is executable, and verifies that copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import ROOT

UNIT = ROOT / "deploy" / "systemd" / "pydra-node.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_system_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/pydra node --system " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/pydra", str(Path(sys.executable).parent / "pydra")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
