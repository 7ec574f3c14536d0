"""What ``pydra launch`` gives the ranks: Pydra's and MPI's settings and the ``--env`` names, not the launcher's own.

In-process, on the functions that decide it (the end-to-end proofs are the
launches in test_launch.py and, for ``PYDRA_HOME`` under a system agent,
test_privsep.py).
"""

from __future__ import annotations

import pytest

from pydra.launcher.environment import LAUNCHER_ONLY, forwarded_names, job_environment, parse_env_option

HERE = {
    "PATH": "/usr/bin:/bin", "HOME": "/home/ann", "SECRET_TOKEN": "t", "MY_VAR": "v",
    "PYDRA_HOME": "/home/ann/.pydra", "PYDRA_PROGRESS": "off", "MPIR_CVAR_CH4_NETMOD": "ofi",
}


def test_the_ranks_get_settings_and_named_variables_but_not_the_launchers_home() -> None:
    env = job_environment(HERE, ["MY_VAR"], {"PYDRA_AGENTS": "{}"})
    assert env["PYDRA_HOME"] == "/home/ann/.pydra"  # mpiexec's helpers, on this host, keep it
    assert forwarded_names(env, ["MY_VAR"]) == ["MPIR_CVAR_CH4_NETMOD", "MY_VAR", "PYDRA_PROGRESS"]


@pytest.mark.parametrize("name", LAUNCHER_ONLY)
def test_env_refuses_the_launchers_own_settings(name: str) -> None:
    with pytest.raises(ValueError, match=f"--env {name}: that setting is the launcher's own, never given to the ranks"):
        parse_env_option(f"{name}=/elsewhere")
