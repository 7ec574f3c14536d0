"""Pydra: cluster computing for Python on MPI.

Write :class:`Task` trees (:class:`Sequence`, :class:`Parallel`,
:class:`MapReduce`, :class:`GangTask`, any nesting) and run them with
:func:`run` or ``pydra run``; or use :class:`Executor`, a
``concurrent.futures.Executor`` over the ranks of an MPI job.

The names below are imported on first use, so that ``import pydra`` (and
the ``pydra`` command line, which launches MPI jobs without being one)
does not initialise MPI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "Task": "pydra.tasks",
    "FunctionTask": "pydra.tasks",
    "Sequence": "pydra.tasks",
    "Parallel": "pydra.tasks",
    "MapReduce": "pydra.tasks",
    "GangTask": "pydra.tasks",
    "Executor": "pydra.executor",
    "run": "pydra.executor",
    "ItemFailed": "pydra.errors",
    "WorkerLost": "pydra.errors",
    "UnitTimeout": "pydra.errors",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pydra' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
