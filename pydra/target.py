"""Resolving the TARGET of ``pydra run``: ``path/to/file.py:Name`` or ``package.module:Name``.

A file target is read on rank 0 and its source travels to every rank with
the job, so workers need no shared filesystem; each rank registers it under
the same module name, which is what lets pickled instances of its classes
find their way home.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydra.errors import TargetError

USAGE = "TARGET must look like path/to/file.py:Name or package.module:Name"

#: the file targets loaded in this process, for an isolated worker to load in its child too
LOADED: list["TargetSpec"] = []


@dataclass(frozen=True)
class TargetSpec:
    """Everything a rank needs to load a target: where it lives and, for a file, its source."""

    text: str
    module: str
    attribute: str
    path: str | None = None
    source: str | None = None


def parse_target(text: str) -> tuple[str, str]:
    """*text*'s file or module and its attribute; TargetError if it does not look like a TARGET."""
    where, sep, attribute = text.rpartition(":")
    if not sep or not where or not attribute.isidentifier():
        raise TargetError(f"{USAGE}, got {text!r}")
    return where, attribute


def read_target(text: str) -> TargetSpec:
    """Parse *text* and, for a file target, read the file (rank 0)."""
    where, attribute = parse_target(text)
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TargetError(f"task file {where} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TargetError(f"cannot read task file {where}: {exc}") from None
        return TargetSpec(text, _module_name(path), attribute, str(path.resolve()), source)
    return TargetSpec(text, where, attribute)


def load_module(spec: TargetSpec) -> types.ModuleType:
    """Import the target's module on this rank, from the shipped source for a file target."""
    if spec.source is None:
        try:
            return importlib.import_module(spec.module)
        except ImportError as exc:
            raise TargetError(f"cannot import module {spec.module}: {exc}") from None
    existing = sys.modules.get(spec.module)
    if existing is not None and getattr(existing, "__file__", None) == spec.path:
        return existing
    module = types.ModuleType(spec.module)
    sys.modules[spec.module] = module  # before exec: dataclasses and pickle look it up
    try:
        _execute(spec, module)
    except TargetError:
        del sys.modules[spec.module]
        raise
    LOADED.append(spec)
    return module


def _execute(spec: TargetSpec, module: types.ModuleType) -> None:
    """Run a task file's shipped source as *module*; TargetError if it raises."""
    assert spec.path is not None and spec.source is not None
    module.__file__ = spec.path
    # Like `python file.py`: the file's own directory comes first on the path, when this host has it.
    directory = str(Path(spec.path).parent)
    if Path(directory).is_dir() and directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        exec(compile(spec.source, spec.path, "exec"), module.__dict__)
    except BaseException as exc:
        raise TargetError(f"task file {spec.path} failed to import: {type(exc).__name__}: {exc}") from exc


class TaskFiles:
    """Task files imported when first needed (by unpickling), not when announced.

    An isolated worker's child process knows every task file its rank has
    loaded, but imports one only when a unit's definition refers to it. So a
    file that no longer imports (its data file removed) fails that file's
    units alone, and a slow import slows only them.

    A finder and loader by protocol (``find_spec``, ``create_module``,
    ``exec_module``), not by ``importlib.abc``'s classes: importing those
    loads ``importlib.resources``, ``tempfile`` and ``shutil`` (with ``bz2`` and
    ``lzma``), 5 ms of every rank's start that nothing here uses.
    """

    def __init__(self) -> None:
        self.specs: dict[str, TargetSpec] = {}

    def add(self, specs: list[TargetSpec]) -> None:
        """Announce task files (their module names become importable)."""
        self.specs.update((spec.module, spec) for spec in specs if spec.source is not None)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        spec = self.specs.get(fullname)
        return None if spec is None else importlib.util.spec_from_loader(fullname, self, origin=spec.path)

    def create_module(self, module_spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        _execute(self.specs[module.__name__], module)


def resolve(spec: TargetSpec, module: types.ModuleType) -> Any:
    """The root task named by *spec*: a Task subclass (instantiated), instance, or factory's result."""
    from pydra.tasks import Task

    try:
        obj = getattr(module, spec.attribute)
    except AttributeError:
        where = spec.text.rpartition(":")[0]  # as the user wrote it: a file's module name may be made up
        kind = "task file" if spec.path else "module"
        raise TargetError(f"{kind} {where} has no attribute {spec.attribute!r}") from None
    if isinstance(obj, type) and obj.__module__.partition(".")[0] == "pydra":
        # pydra:Task, pydra:MapReduce...: a base class to subclass (or, for Parallel, a task to give), not a task
        raise TargetError(f"{spec.text} is Pydra's own {obj.__name__}: name a task of yours (a subclass, an "
                          "instance or a factory)")
    if isinstance(obj, type) and issubclass(obj, Task):
        return _build(spec, obj)
    if isinstance(obj, Task):
        return obj
    if callable(obj):
        task = _build(spec, obj)
        if isinstance(task, Task):
            return task
        raise TargetError(f"{spec.text}() returned {type(task).__name__}, expected a Task")
    raise TargetError(f"{spec.text} is of type {type(obj).__name__}; expected a Task subclass, instance or factory")


def _build(spec: TargetSpec, factory: Any) -> Any:
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise TargetError(f"cannot call {spec.text} with no arguments: {exc}") from None
    except ValueError:  # no signature to inspect (some builtins): just try
        pass
    try:
        return factory()
    except Exception as exc:
        raise TargetError(f"{spec.text}() raised {type(exc).__name__}: {exc}") from exc


def _module_name(path: Path) -> str:
    """A module name for a task file that does not shadow an importable module."""
    stem = path.stem if path.stem.isidentifier() else "task"
    if stem in sys.modules or stem in sys.stdlib_module_names:
        return f"pydra_target_{stem}"
    return stem
