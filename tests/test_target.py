"""pydra.target: reading a TARGET, and task files imported when first needed (an isolated worker's child)."""

from __future__ import annotations

import importlib
import pickle
import sys
from pathlib import Path
from typing import Iterator

import pytest

from pydra import target as targets
from pydra.errors import TargetError


@pytest.fixture
def task_files() -> Iterator[targets.TaskFiles]:
    """A TaskFiles finder first on sys.meta_path for the test; the modules it imported are forgotten after."""
    finder = targets.TaskFiles()
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name in finder.specs:
            sys.modules.pop(name, None)


def write(path: Path, text: str) -> targets.TargetSpec:
    path.write_text(text)
    return targets.read_target(f"{path}:Name")


def test_a_task_file_is_imported_only_once_something_refers_to_it(tmp_path: Path, task_files: targets.TaskFiles) -> None:
    marks = tmp_path / "imported"
    spec = write(tmp_path / "lazy_job_a.py", f"open({str(marks)!r}, 'a').write('x')\nclass Name:\n    pass\n")
    task_files.add([spec])
    assert not marks.exists()  # announced, not imported

    # What an isolated child sees: a definition pickled on the rank, referring to the file's class.
    module = importlib.import_module(spec.module)
    blob = pickle.dumps(module.Name)
    sys.modules.pop(spec.module)
    assert pickle.loads(blob).__module__ == spec.module
    assert module.__file__ == spec.path
    assert marks.read_text() == "xx"  # once by hand above, once by unpickling


def test_a_file_that_no_longer_imports_fails_its_own_units_only(tmp_path: Path, task_files: targets.TaskFiles) -> None:
    data = tmp_path / "data.txt"
    data.write_text("42")
    broken = write(tmp_path / "lazy_job_broken.py", f"VALUE = open({str(data)!r}).read()\n")
    fine = write(tmp_path / "lazy_job_fine.py", "VALUE = 'fine'\n")
    data.unlink()  # the data file was removed after the job that needed it
    task_files.add([broken, fine])

    assert importlib.import_module(fine.module).VALUE == "fine"
    with pytest.raises(TargetError, match=r"task file .*lazy_job_broken.py failed to import: FileNotFoundError"):
        importlib.import_module(broken.module)
    assert broken.module not in sys.modules  # a later unit tries again, and may succeed
    data.write_text("43")
    assert importlib.import_module(broken.module).VALUE == "43"


def test_a_module_target_is_left_to_the_usual_import(task_files: targets.TaskFiles) -> None:
    spec = targets.read_target("json:dumps")
    task_files.add([spec])
    assert task_files.specs == {}
    assert task_files.find_spec("json") is None


@pytest.mark.parametrize("text", ["nothing", "file.py", ":Name", "file.py:not-a-name"])
def test_a_malformed_target_is_one_line_saying_what_it_must_look_like(text: str) -> None:
    with pytest.raises(TargetError, match="TARGET must look like path/to/file.py:Name or package.module:Name"):
        targets.read_target(text)


@pytest.mark.parametrize("name", ["Task", "MapReduce", "GangTask", "Parallel"])
def test_pydras_own_classes_are_no_target(name: str) -> None:
    """``pydra:Task`` ran, and failed at run time with "Task must override work()" and exit 1."""
    spec = targets.read_target(f"pydra:{name}")
    with pytest.raises(TargetError, match=rf"^pydra:{name} is Pydra's own {name}: name a task of yours"):
        targets.resolve(spec, targets.load_module(spec))
