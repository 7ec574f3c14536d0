"""The task model: what users subclass and compose into trees."""

from pydra.tasks.base import FunctionTask, Task, as_task
from pydra.tasks.containers import Parallel, Sequence
from pydra.tasks.gang import GangTask
from pydra.tasks.mapreduce import MapReduce

__all__ = ["Task", "FunctionTask", "as_task", "Sequence", "Parallel", "MapReduce", "GangTask"]
