"""pydra.cpus: each host's cores shared out among its workers, in the variables numerical libraries read.

The rules are checked in-process; real jobs (``pydra run`` under mpiexec)
show that every worker gets its share before its TARGET loads numpy, that
OpenBLAS then starts that many threads, and that a user's own choice stands.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

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


def fake_cgroups(tmp_path, membership: str, mount: str, files: dict[str, str]):
    """A /proc/self/cgroup, a mountinfo and a hierarchy of cgroup files under tmp_path/fs: quota()'s arguments."""
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(membership)
    (tmp_path / "mountinfo").write_text(mount.replace("FS", str(tmp_path / "fs")))
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


V1_MOUNT = "32 31 0:29 / FS rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
V2_MOUNT = "30 23 0:27 / FS rw,nosuid - cgroup2 cgroup2 rw\n"


def test_v1_quotas_the_least_of_a_cgroup_and_its_ancestors_counts(tmp_path) -> None:
    files = {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000",
             "job/cpu.cfs_quota_us": "400000", "job/cpu.cfs_period_us": "100000",
             "job/step/cpu.cfs_quota_us": "150000", "job/step/cpu.cfs_period_us": "100000"}
    assert cpus.quota(*fake_cgroups(tmp_path, "4:cpu,cpuacct:/job/step\n1:memory:/\n", V1_MOUNT, files)) == 2


def test_no_v1_quota_is_none(tmp_path) -> None:
    files = {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}
    assert cpus.quota(*fake_cgroups(tmp_path, "4:cpu,cpuacct:/\n", V1_MOUNT, files)) is None


def test_a_v2_cpu_max_counts_and_max_is_no_quota(tmp_path) -> None:
    files = {"cpu.max": "max 100000", "pod/cpu.max": "300000 100000"}
    assert cpus.quota(*fake_cgroups(tmp_path, "0::/pod\n", V2_MOUNT, files)) == 3
    assert cpus.quota(*fake_cgroups(tmp_path / "b", "0::/\n", V2_MOUNT, {"cpu.max": "max 100000"})) is None


def test_a_container_that_sees_its_own_cgroup_as_the_mount_reads_the_mount(tmp_path) -> None:
    """Without a cgroup namespace: the membership names the host's path, the mount is the container's cgroup."""
    mount = "32 31 0:29 /docker/abc FS rw - cgroup cgroup rw,cpu\n"
    files = {"cpu.cfs_quota_us": "200000", "cpu.cfs_period_us": "100000"}
    assert cpus.quota(*fake_cgroups(tmp_path, "4:cpu:/docker/abc\n", mount, files)) == 2
    assert cpus.quota(*fake_cgroups(tmp_path / "b", "4:cpu:/elsewhere\n", mount, files)) == 2


def test_no_cgroups_is_no_quota(tmp_path) -> None:
    assert cpus.quota(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_files_that_do_not_read_as_expected_are_no_quota(tmp_path) -> None:
    files = {"cpu.cfs_quota_us": "lots", "cpu.cfs_period_us": "100000"}
    assert cpus.quota(*fake_cgroups(tmp_path, "4:cpu:/\n", V1_MOUNT, files)) is None
    assert cpus.quota(*fake_cgroups(tmp_path / "b", "0::/\n", V2_MOUNT, {"cpu.max": "100000 0"})) is None


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


def cpu_hierarchy() -> str | None:
    """Where cgroup v1's cpu controller is mounted (its root), if it is."""
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            after = fields[fields.index("-") + 1:]
            if after[0] == "cgroup" and "cpu" in after[2].split(",") and fields[3] == "/":
                return fields[4]
    return None


def test_a_cpu_quota_caps_a_workers_share(tmp_path) -> None:
    """The job in a cgroup of its own with a quota of one CPU: its one worker gets one thread, not one per core."""
    hierarchy = cpu_hierarchy()
    if os.geteuid() != 0 or hierarchy is None:
        pytest.skip("needs root and cgroup v1's cpu controller, to make a cgroup with a quota")
    group = Path(hierarchy) / f"pydra-test-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text())))
        enter = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh"]
        for item in run_report(tmp_path, 2, enter):
            if item["cpus"] == 1:
                pytest.skip("the launcher bound the worker to one CPU: the quota changes nothing")
            assert item["told"] == {name: "1" for name in cpus.VARIABLES}
            assert item["threads"] == 1
    finally:
        group.rmdir()  # the job has ended: the cgroup is empty
