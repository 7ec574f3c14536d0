"""What environment a launched job gets: Pydra's settings, MPI's, and what the user names.

``pydra launch`` never forwards the launcher's environment wholesale: a token
exported in the launching shell stays there. mpiexec itself runs with
:data:`OWN` (what a program needs to run at all), and the ranks get the names
in :func:`forwarded_names`, their values sent by mpiexec through the tunnelled
control connection (MPICH) or its daemons (Open MPI), never on a command line.
Paths of the launcher's (``PYDRA_HOME``) stay with it (:data:`LAUNCHER_ONLY`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: variables mpiexec itself needs on the launching host (not forwarded to remote ranks)
OWN = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TERM")
#: prefixes of the settings of Pydra and of the MPI libraries, forwarded to every rank
PREFIXES = ("PYDRA_", "MPIR_CVAR_", "MPICH_", "HYDRA_", "UCX_", "FI_", "OMPI_MCA_", "PRTE_MCA_", "PMIX_MCA_")
#: Pydra settings for the launching host only, never forwarded (not even with ``--env``): those meant
#: for pydra-remote-exec, and PYDRA_HOME, a directory of the launcher's on the launcher's machine. A
#: rank's PYDRA_HOME (where rank 0 journals) is its host's: the agent's own in single-user mode, the
#: user's ~/.pydra under ``pydra node --system``, which runs the rank as a user who may not enter ours.
LAUNCHER_ONLY = ("PYDRA_AGENTS", "PYDRA_IDENTITY", "PYDRA_IDENTITY_AGENT", "PYDRA_KNOWN_HOSTS", "PYDRA_CONNECTOR",
                 "PYDRA_HOME")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_env_option(text: str) -> tuple[str, str | None]:
    """``NAME`` (its value here) or ``NAME=VALUE``, as given to ``--env``."""
    name, sep, value = text.partition("=")
    if not _NAME.match(name):
        raise ValueError(f"--env {text!r}: expected NAME or NAME=VALUE")
    if name in LAUNCHER_ONLY:
        raise ValueError(f"--env {name}: that setting is the launcher's own, never given to the ranks")
    return name, value if sep else None


def job_environment(here: Mapping[str, str], named: list[str], settings: Mapping[str, str]) -> dict[str, str]:
    """The environment to start mpiexec with.

    *here* is the launcher's environment, *named* the ``--env`` options and
    *settings* what Pydra sets for this job (``PYDRA_*``, MPI's settings).
    A ``--env NAME`` whose variable is unset here is the user's mistake.
    """
    env = {name: here[name] for name in OWN if name in here}
    env.update({name: value for name, value in here.items() if name.startswith(PREFIXES)})
    for text in named:
        name, value = parse_env_option(text)
        if value is None:
            if name not in here:
                raise ValueError(f"--env {name}: {name} is not set here")
            value = here[name]
        env[name] = value
    env.update(settings)
    return env


def forwarded_names(env: Mapping[str, str], named: list[str]) -> list[str]:
    """The names of *env* the ranks get: the settings' prefixes and the ``--env`` names."""
    names = {parse_env_option(text)[0] for text in named}
    return sorted(
        name for name in env
        if (name.startswith(PREFIXES) or name in names) and name not in LAUNCHER_ONLY
    )
