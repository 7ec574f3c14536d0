"""Pydra: cluster computing for Python on MPI.

Write :class:`Task` trees (:class:`Sequence`, :class:`Parallel`,
:class:`MapReduce`, :class:`GangTask`, any nesting) and run them with
:func:`run` or ``pydra run``; or use :class:`Executor`, a
``concurrent.futures.Executor`` over the ranks of an MPI job.
"""

from pydra.executor import Executor, run
from pydra.tasks import FunctionTask, GangTask, MapReduce, Parallel, Sequence, Task

__version__ = "0.1.0"

__all__ = ["Task", "FunctionTask", "Sequence", "Parallel", "MapReduce", "GangTask", "Executor", "run"]
