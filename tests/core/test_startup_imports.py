"""Start-up loads only what a run uses (issue 12, item 3): guards on the lazy imports, not on time.

Every module loaded costs each of the job's processes its import time, and
on a machine with fewer cores than ranks the ranks start one after another.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

from mpijobs import JOBS, mpi_environment, result_line, run_process, run_script

#: never needed to launch a job or to run a plain tree
HEAVY = ["numpy", "cryptography", "prompt_toolkit"]


def loaded_after(code: str) -> list[str]:
    """Which modules of HEAVY (and more) a fresh interpreter has loaded after running *code*."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=mpi_environment(),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_process_that_launches_a_job_loads_nothing_heavy() -> None:
    """What `pydra run -n N` loads before it starts mpiexec: the CLI and the launcher."""
    modules = loaded_after(
        "import pydra.cli, pydra.batch, pydra.progress\n"
        "from pydra.launcher.mpiexec import find_mpiexec\n"
        "find_mpiexec()"
    )
    unwanted = HEAVY + ["asyncio", "sqlite3", "pydra.journal", "pydra._core.master", "pydra.comm.seal",
                        "pydra.comm.admission"]  # only a listener needs it (its settings parse lazily)
    assert [name for name in unwanted if name in modules] == []


def test_pydra_run_n_loads_nothing_heavy_from_start_to_end(tmp_path) -> None:
    """The launching process of a real ``pydra run -n 2``, to its exit: its job watch and started notice included.

    (The job watch's process-tree module once imported asyncio at the top,
    and the notice's name came from ``secrets``: 34 ms of every run.)
    """
    probe = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print('LOADED ' + json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
        f"sys.argv = ['pydra', 'run', '-n', '2', '{JOBS / 'startup_modules.py'}:Loaded', 'a', 'b', '--output',"
        f" '{tmp_path / 'result.json'}']\n"
        "runpy.run_module('pydra', run_name='__main__', alter_sys=True)\n"
    )
    done = run_process([sys.executable, "-c", probe], timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "result.json").read_text()) == [[], []]
    modules = json.loads(re.search(r"^LOADED (.*)$", done.stderr, re.M).group(1))
    assert "pydra.launcher.jobwatch" in modules  # the probe saw the whole run
    unwanted = HEAVY + ["asyncio", "ssl", "secrets", "sqlite3", "pydra.journal", "pydra._core.master"]
    assert [name for name in unwanted if name in modules] == []


def test_a_worker_rank_loads_neither_rank_0s_half_nor_heavy_libraries(tmp_path) -> None:
    """A real `pydra run -n 3` of a Parallel: each worker reports what it has loaded when its item runs."""
    argv = [sys.executable, "-m", "pydra", "run", "-n", "3", "--no-journal", f"{JOBS / 'startup_modules.py'}:Loaded",
            "a", "b", "c", "d", "--output", str(tmp_path / "result.json")]
    done = run_process(argv, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "result.json").read_text()) == [[], [], [], []]
    # Rank 0 runs the scheduler (asyncio) but needs no numpy, cryptography or prompt_toolkit either.
    rank_0 = ast.literal_eval(re.search(r"^rank 0 loaded: (.*)$", done.stderr, re.M).group(1))
    assert "pydra._core.master" in rank_0  # the probe sees what is loaded
    # Nor secrets, for the --output file's temporary name (6 ms).
    assert [name for name in HEAVY + ["pydra.comm.admission", "secrets"] if name in rank_0] == []


def test_a_worker_of_a_script_loads_neither_asyncio_nor_the_master(tmp_path) -> None:
    """``pydra.run`` in a user's script under mpiexec: the workers import the Executor's module, not rank 0's half.

    (Nor ``importlib.abc``, which brings ``tempfile``, ``shutil``, ``bz2`` and
    ``lzma``: the task files' finder needs none of its classes.)

    asyncio alone took about 40 ms to import here, paid by every worker
    before its first unit (and on a 2-core machine, by rank 0 beside them).
    """
    done = run_script(3, "startup_modules.py", timeout=120)
    assert done.returncode == 0, done.stderr
    for modules in result_line(done):
        assert [name for name in HEAVY + ["asyncio", "pydra._core.master", "pydra._core.scheduler",
                                          "pydra._core.evaluate", "importlib.abc", "tempfile"]
                if name in modules] == []


def test_a_mapreduce_shuffle_loads_nothing_heavy(tmp_path) -> None:
    """The shuffle moves its byte counts without numpy: importing it would cost every worker, inside the job."""
    argv = [sys.executable, "-m", "pydra", "run", "-n", "3", "--no-journal", f"{JOBS / 'startup_modules.py'}:Shuffled",
            "a", "b", "c", "d", "--output", str(tmp_path / "result.json")]
    done = run_process(argv, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "result.json").read_text()) == {key: [] for key in "abcd"}
