"""How every message of a job becomes bytes and back: pickle protocol 5, or the job's ``PYDRA_SERIALIZER``.

Call :func:`dumps` and :func:`loads` through the module (``serial.dumps``):
:func:`use` rebinds them once, at the start of a session, on every rank.
This module imports no MPI, so the sans-IO scheduler may use it.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any

PICKLE_PROTOCOL = 5

#: ``PYDRA_SERIALIZER`` values that are installable extras of pydra-mpi
SERIALIZERS = ("pickle", "cloudpickle", "dill")


def dumps(obj: Any) -> bytes:
    """Serialise *obj* for the wire (rebound by :func:`use`)."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


#: Deserialise a message (rebound by :func:`use`).
loads = pickle.loads

_pickle_dumps = dumps


def use(name: str) -> None:
    """Pickle every message of this process with module *name*'s ``dumps``/``loads`` (protocol 5).

    ``pickle`` is the default; ``cloudpickle`` and ``dill`` also send lambdas,
    closures and classes defined in ``__main__``. Every rank must use the same
    one: its output is read with its own ``loads``. Raises ``ValueError`` (one
    line) if the module cannot be imported or lacks the two functions.
    mpi4py's own object messages (``comm.bcast`` in a gang task) follow suit.
    """
    global dumps, loads
    if name == "pickle":
        dumps, loads = _pickle_dumps, pickle.loads
        return
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        extra = f" (pip install 'pydra-mpi[{name}]')" if name in SERIALIZERS else ""
        raise ValueError(f"PYDRA_SERIALIZER={name}: cannot import {name}{extra}: {exc}") from None
    module_dumps, module_loads = getattr(module, "dumps", None), getattr(module, "loads", None)
    if not (callable(module_dumps) and callable(module_loads)):
        raise ValueError(f"PYDRA_SERIALIZER={name}: the module has no dumps() and loads()")
    dumps = lambda obj: module_dumps(obj, protocol=PICKLE_PROTOCOL)  # noqa: E731
    loads = module_loads
    # mpi4py's object collectives too: a gang task's self.comm.bcast(lambda) then works.
    from mpi4py import MPI

    MPI.pickle.__init__(module_dumps, module_loads, PICKLE_PROTOCOL)
