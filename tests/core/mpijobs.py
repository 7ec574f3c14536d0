"""Test-side helpers for tests/core: run the job scripts of tests/core/jobs and read their reports.

Every multi-rank job goes through the helpers of tests/testkit.py
(``run_mpi``, ``run_pydra``, ``run_process``): each job runs in its own
session with a timeout, and is killed by process group if it overruns.
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
JOBS = HERE / "jobs"
ROOT = HERE.parent.parent

if str(JOBS) not in sys.path:  # the tests compute serial answers with core_workloads
    sys.path.insert(0, str(JOBS))

import core_workloads as workloads  # noqa: E402, F401  (re-exported: the jobs' functions, for serial answers)


from testkit import Finished, mpi_environment, mpiexec_argv, run_mpi, run_pydra, run_process, stop_group  # noqa: E402, F401

#: ``ranks`` value meaning "no mpiexec at all: the whole tree runs in the one pytest-started process"
IN_PROCESS = 0


def rank_params(*counts: int) -> list:
    """pytest params for these rank counts (IN_PROCESS = no mpiexec); 2 ranks is the smoke case."""
    names = {IN_PROCESS: "in-process", 1: "1-rank"}
    return [
        pytest.param(n, id=names.get(n, f"{n}-ranks"), marks=pytest.mark.smoke if n == 2 else ())
        for n in counts
    ]


def run_script(ranks: int, script: str, args: list[str] | None = None, timeout: float = 60, **kwargs: Any) -> Any:
    """Run tests/core/jobs/*script* on *ranks* ranks (IN_PROCESS: plain ``python script``)."""
    program = [str(JOBS / script), *(args or [])]
    if ranks == IN_PROCESS:
        return run_process([sys.executable, *program], timeout=timeout, **kwargs)
    return run_mpi(ranks, program, timeout=timeout, **kwargs)


def result_line(finished: Any, tag: str = "RESULT") -> Any:
    """The JSON after the last ``RESULT`` line of a job's stdout (fails with the job's output if none)."""
    for line in reversed(finished.stdout.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise AssertionError(
        f"no {tag} line (exit {finished.returncode})\nstdout:\n{finished.stdout[-3000:]}\nstderr:\n{finished.stderr[-3000:]}"
    )


@dataclass
class Outcome:
    """What happened to one case of a job script (see tests/core/jobs/core_jobkit.py)."""

    status: str  # "ok", "error", "hung", "died"
    value: Any = None
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.value!r} {self.detail}".strip()


@dataclass
class CaseRun:
    """The outcomes of a list of cases, possibly gathered over several jobs."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    jobs: int = 0
    log: list[str] = field(default_factory=list)

    def ok(self, name: str) -> Any:
        """The value of case *name*, asserting that it completed without an exception."""
        outcome = self.outcomes.get(name)
        assert outcome is not None, f"case {name} was never run\n" + "\n".join(self.log)
        assert outcome.status == "ok", f"case {name}: {outcome}"
        return outcome.value

    def error(self, name: str) -> dict:
        """The description of the exception case *name* raised on rank 0."""
        outcome = self.outcomes.get(name)
        assert outcome is not None, f"case {name} was never run\n" + "\n".join(self.log)
        assert outcome.status == "error", f"case {name} should have raised on rank 0, got {outcome}"
        return outcome.value


_LITERALS = {"__builtins__": {}, "frozenset": frozenset, "set": set, "inf": float("inf"), "nan": float("nan")}


def parse_value(text: str) -> Any:
    """A value printed with repr() by a job: a Python literal, or a frozenset/set of literals."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return eval(text, dict(_LITERALS))  # our own jobs' output: literals and frozenset(...)


def run_cases(ranks: int, script: str, cases: list[str], timeout: float = 90, env: dict | None = None) -> CaseRun:
    """Run *cases* of *script* on *ranks* ranks; a hung or fatal case is recorded and the rest rerun."""
    run = CaseRun()
    remaining = list(cases)
    while remaining and run.jobs < len(cases) + 1:
        run.jobs += 1
        finished = run_script(ranks, script, remaining, timeout=timeout, env=env)
        started: list[str] = []
        for line in finished.stdout.splitlines():
            tag, _, rest = line.partition(" ")
            name, _, payload = rest.partition(" ")
            if tag == "START":
                started.append(name)
            elif tag == "CASE":
                run.outcomes[name] = Outcome("ok", parse_value(payload))
            elif tag == "ERROR":
                run.outcomes[name] = Outcome("error", parse_value(payload))
            elif tag == "HUNG":
                run.outcomes[name] = Outcome("hung", None, "overran the job's per-case deadline")
        unresolved = [name for name in started if name not in run.outcomes]
        if unresolved:  # the job died (abort, crash) in the middle of this case
            tail = finished.stderr.strip().splitlines()[-12:]
            run.outcomes[unresolved[-1]] = Outcome(
                "died", None, f"job exited {finished.returncode} during this case; stderr tail:\n" + "\n".join(tail)
            )
        run.log.append(f"job {run.jobs}: exit {finished.returncode}, {len(started)} cases started")
        if not started:
            raise AssertionError(
                f"{script} started no case on {ranks} ranks (exit {finished.returncode})\n"
                f"stdout:\n{finished.stdout[-3000:]}\nstderr:\n{finished.stderr[-3000:]}"
            )
        remaining = [name for name in remaining if name not in run.outcomes]
    return run


class CaseCache:
    """One :func:`run_cases` per (ranks, env) per test module, shared by its parametrized tests."""

    def __init__(self, script: str, cases: list[str], timeout: float = 90) -> None:
        self.script, self.cases, self.timeout = script, cases, timeout
        self._runs: dict[tuple, CaseRun | BaseException] = {}

    def __call__(self, ranks: int, env: dict | None = None) -> CaseRun:
        key = (ranks, tuple(sorted((env or {}).items())))
        if key not in self._runs:
            full_env = None
            if env:
                full_env = mpi_environment()
                full_env.update(env)
            try:
                self._runs[key] = run_cases(ranks, self.script, self.cases, self.timeout, full_env)
            except BaseException as exc:  # pytest.fail on a timeout too: fail the other tests at once
                self._runs[key] = exc
        run = self._runs[key]
        if isinstance(run, BaseException):
            raise AssertionError(f"{self.script} on {ranks} ranks could not run: {run}") from run
        return run


def workers_of(ranks: int) -> int:
    """How many ranks run units: all but rank 0, or rank 0 itself when it is alone."""
    return max(1, ranks - 1)
