"""The systemd units in ``deploy/systemd/`` (``user/`` and ``system/``), read as systemd reads them.

Enough of systemd's rules for these units: ``Key=Value`` lines per section,
``Environment=`` then ``EnvironmentFile=`` (``-`` for optional) setting
variables, ``%h`` for the home directory and ``${NAME}`` for a variable in
``ExecStart=``. Anything else in the command line fails loudly rather than
being guessed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from testkit import ROOT

USER_UNIT = ROOT / "deploy" / "systemd" / "user" / "pydra-node.service"
SYSTEM_UNIT = ROOT / "deploy" / "systemd" / "system" / "pydra-node.service"


def directives(unit: Path, section: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` lines of *section*, in order (a key may repeat)."""
    found, current = [], None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            found.append((key.strip(), value.strip()))
    return found


def exec_start(unit: Path, home: Path) -> list[str]:
    """The argv of the unit's ``ExecStart=`` for a user whose home is *home*."""
    service = directives(unit, "Service")
    variables: dict[str, str] = {}
    for key, value in service:
        value = value.replace("%h", str(home))
        if key == "Environment":
            variables.update(word.split("=", 1) for word in shlex.split(value))
        elif key == "EnvironmentFile":
            path = Path(value.removeprefix("-"))
            if path.exists() or not value.startswith("-"):
                for line in path.read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        name, _, text = line.partition("=")
                        variables[name.strip()] = text.strip()
    [command] = [value for key, value in service if key == "ExecStart"]
    command = re.sub(r"\$\{(\w+)\}", lambda match: variables[match.group(1)], command.replace("%h", str(home)))
    assert "%" not in command and "$" not in command, f"unexpanded in ExecStart: {command}"
    return shlex.split(command)
