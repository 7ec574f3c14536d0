"""pydra.cpus: each host's cores shared out among its workers, in the variables numerical libraries read.

The rules are checked in-process; real jobs (``pydra run`` under mpiexec)
show that every worker gets its share before its TARGET loads numpy, that
OpenBLAS then starts that many threads, and that a user's own choice stands.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from testkit import ROOT, mpi_environment, mpiexec_argv, run_process

from pydra import cpus

TARGET = f"{ROOT / 'tests' / 'core' / 'jobs' / 'cpus_report.py'}:Report"


# -- the rules --------------------------------------------------------------------------------------


def test_the_workers_of_one_host_share_its_cores_and_rank_0_takes_no_share() -> None:
    keys = [7, 7, 7]  # rank 0 and two workers, one host, no binding
    assert [cpus.threads(8, keys, rank) for rank in range(3)] == [4, 4, 4]


def test_a_one_rank_job_keeps_every_core() -> None:
    assert cpus.threads(8, [7], 0) == 8


def test_ranks_bound_to_cores_of_their_own_keep_them() -> None:
    keys = [1, 2, 3, 4]  # each rank bound to a CPU set of its own (or on a host of its own)
    assert [cpus.threads(16, keys, rank) for rank in range(4)] == [16, 16, 16, 16]


def test_only_the_ranks_on_the_same_cores_share_them() -> None:
    keys = [5, 5, 9, 9, 9, 5]  # two hosts: rank 0 with workers 1 and 5, workers 2-4 on the other
    assert [cpus.threads(12, keys, rank) for rank in range(6)] == [6, 6, 4, 4, 4, 6]


def test_more_workers_than_cores_get_one_thread_each() -> None:
    assert cpus.threads(2, [3] * 5, 1) == 1


def test_a_host_and_cpu_set_make_one_key() -> None:
    assert cpus._key("node1", {0, 1}) == cpus._key("node1", {1, 0})
    assert len({cpus._key("node1", {0, 1}), cpus._key("node2", {0, 1}), cpus._key("node1", {0})}) == 3


def test_auto_sets_every_variable_to_the_share() -> None:
    assert cpus.variables({}, "auto", 3) == {name: "3" for name in cpus.VARIABLES}


def test_a_number_sets_every_variable_to_it() -> None:
    assert cpus.variables({}, 5, 3) == {name: "5" for name in cpus.VARIABLES}


def test_off_sets_nothing() -> None:
    assert cpus.variables({}, "off", 3) == {}


@pytest.mark.parametrize("name", cpus.VARIABLES)
def test_a_variable_the_user_set_leaves_all_of_them_alone(name: str) -> None:
    assert cpus.variables({name: "6"}, "auto", 3) == {}
    assert cpus.variables({name: "6"}, 2, 3) == {}


def test_an_empty_variable_counts_as_unset() -> None:
    assert cpus.variables({"OMP_NUM_THREADS": ""}, "auto", 3) == {name: "3" for name in cpus.VARIABLES}


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("off", "off"), ("1", 1), ("64", 64)])
def test_the_setting_reads(text: str, value: object) -> None:
    assert cpus.parse_threads(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "two", "", "1.5"])
def test_the_setting_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        cpus.parse_threads(text)


# -- real jobs --------------------------------------------------------------------------------------


def run_report(tmp_path, ranks: int, prefix: list[str] | None = None, **env: str) -> list[dict]:
    """``mpiexec -n RANKS python -m pydra run`` of the report (under *prefix*, a command like taskset)."""
    environment = mpi_environment()
    for name in cpus.VARIABLES:
        environment.pop(name, None)
    environment.update(env)
    out = tmp_path / "report.json"
    argv = [sys.executable, "-m", "pydra", "run", "--no-journal", TARGET, "a", "b", "c", "--output", str(out)]
    done = run_process([*(prefix or []), *mpiexec_argv(ranks, argv)], env=environment, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_workers_share_this_machines_cores_and_openblas_obeys(tmp_path) -> None:
    for item in run_report(tmp_path, 3):
        share = max(1, item["cpus"] // 2)  # all the machine's CPUs, unless the launcher bound the ranks
        assert item["told"] == {name: str(share) for name in cpus.VARIABLES}
        assert item["threads"] == share


def test_ranks_confined_to_one_cpu_get_one_thread(tmp_path) -> None:
    if shutil.which("taskset") is None:
        pytest.skip("no taskset")
    for item in run_report(tmp_path, 2, ["taskset", "-c", "0"]):
        assert item["cpus"] == 1
        assert item["told"] == {name: "1" for name in cpus.VARIABLES}
        assert item["threads"] == 1


def test_a_users_own_variable_stands_and_pydra_sets_none(tmp_path) -> None:
    for item in run_report(tmp_path, 3, OMP_NUM_THREADS="1"):
        assert item["told"] == {name: ("1" if name == "OMP_NUM_THREADS" else None) for name in cpus.VARIABLES}
        assert item["threads"] == 1  # OpenBLAS reads OMP_NUM_THREADS too


def test_pydra_threads_off_leaves_openblas_its_default(tmp_path) -> None:
    for item in run_report(tmp_path, 3, PYDRA_THREADS="off"):
        assert item["told"] == {name: None for name in cpus.VARIABLES}
        assert item["threads"] == item["cpus"]


def test_pydra_threads_sets_a_number(tmp_path) -> None:
    for item in run_report(tmp_path, 3, PYDRA_THREADS="7"):
        assert item["told"] == {name: "7" for name in cpus.VARIABLES}
        assert item["threads"] == min(7, item["cpus"])
