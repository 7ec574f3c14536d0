"""Tests for pydra.launcher.hostfile: hostfiles, Slurm and PBS allocations."""

from pathlib import Path

import pytest

from pydra.launcher.hostfile import (
    DEFAULT_AGENT_PORT,
    Host,
    HostfileError,
    expand_nodelist,
    expand_tasks_per_node,
    hosts_from_environment,
    parse_hostfile,
    read_hostfile,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "hostfiles"


def test_mpich_style():
    assert parse_hostfile("node01:4\nnode02\n") == [Host("node01", 4), Host("node02", 1)]


def test_openmpi_style():
    text = "node01 slots=4\nnode02 slots=2 max_slots=8\n"
    assert parse_hostfile(text) == [Host("node01", 4), Host("node02", 2, max_slots=8)]


def test_port_on_either_style():
    text = "node01:4 port=7000\nnode02 slots=2 port=7001\nnode03\n"
    assert [host.port for host in parse_hostfile(text)] == [7000, 7001, DEFAULT_AGENT_PORT]


def test_user_at_host_names_who_a_system_agent_runs_as():
    hosts = parse_hostfile("bob@node01:2 port=7000\nnode02\nbob@node01 port=7000\nalice@node01 port=7000\n")
    assert hosts == [Host("node01", 3, port=7000, user="bob"), Host("node02"),  # bob's two lines merged
                     Host("node01", 1, port=7000, user="alice")]  # the same host as another user is another host
    assert [host.label for host in hosts] == ["bob@node01", "node02", "alice@node01"]


@pytest.mark.parametrize("entry", ["@node01", "bo b@node01", "b:ob@node01", "bob!@node01", "bob@"])
def test_malformed_user_at_host_is_refused(entry):
    with pytest.raises(HostfileError, match="hosts.txt:1: "):
        parse_hostfile(entry + "\n", source="hosts.txt")


def test_comments_and_blank_lines():
    text = "# cluster\n\n   \nnode01:2   # the first node\n  node02 # indented\n"
    assert parse_hostfile(text) == [Host("node01", 2), Host("node02")]


def test_duplicates_are_merged_in_first_position():
    text = "a:2\nb\na slots=3\n"
    assert parse_hostfile(text) == [Host("a", 5), Host("b")]


def test_merged_max_slots_add_up_or_stay_unlimited():
    assert parse_hostfile("a slots=1 max_slots=2\na slots=1 max_slots=3\n") == [Host("a", 2, 5)]
    assert parse_hostfile("a slots=1 max_slots=2\na\n") == [Host("a", 2, None)]


def test_same_name_on_different_ports_is_two_hosts():
    text = "localhost port=7470\nlocalhost port=7471\n"
    assert parse_hostfile(text) == [Host("localhost"), Host("localhost", port=7471)]


def test_host_is_frozen():
    with pytest.raises(AttributeError):
        Host("a").slots = 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("node01:x", "slots must be a positive integer, got 'x'"),
        ("node01:0", "slots must be a positive integer, got '0'"),
        ("node01:", "slots must be a positive integer, got ''"),
        ("node01 slots=-1", "slots must be a positive integer, got '-1'"),
        ("node01 slots=2 max_slots=1", r"max_slots \(1\) must not be less than slots \(2\)"),
        ("node01:2 slots=2", "slots is given twice"),
        ("node01 port=0", "port must be a positive integer"),
        ("node01 port=70000", "port must be at most 65535"),
        ("node01 slots=1000000", r"slots=1000000 is more processes than one host runs \(at most 16384\)"),
        ("node01:100000000000000000000", r"slots=100000000000000000000 is more processes than one host runs"),
        ("node01 max_slots=20000", r"max_slots=20000 is more processes than one host runs"),
        ("node01 cpus=4", "expected slots=N, max_slots=N or port=N, got 'cpus=4'"),
        ("node01 4", "expected slots=N, max_slots=N or port=N, got '4'"),
        ("slots=4", "expected a host name first"),
        (":4", "expected a host name first"),
    ],
)
def test_malformed_lines_are_reported_with_line_numbers(line, message):
    with pytest.raises(HostfileError, match=f"^hosts.txt:3: {message}"):
        parse_hostfile(f"# header\nnode00\n{line}\n", source="hosts.txt")


def test_empty_hostfile_is_an_error():
    with pytest.raises(HostfileError, match=r"^hosts\.txt: no hosts listed$"):
        parse_hostfile("# nothing here\n", source="hosts.txt")


def test_read_hostfile_names_the_file(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text("node01:2\nnode02:two\n")
    with pytest.raises(HostfileError, match=f"^{path}:2: "):
        read_hostfile(path)


@pytest.mark.parametrize(
    "name", ["localhost", "mpich-style.txt", "openmpi-style.txt", "three-loopback-hosts.txt"]
)
def test_example_hostfiles_parse(name):
    assert read_hostfile(EXAMPLES / name)


def test_three_loopback_hosts_example():
    hosts = read_hostfile(EXAMPLES / "three-loopback-hosts.txt")
    assert [host.name for host in hosts] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


# --- Slurm and PBS ----------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, names",
    [
        ("login1", ["login1"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        (
            "node[01-04,07],gpu[1-2],login1",
            ["node01", "node02", "node03", "node04", "node07", "gpu1", "gpu2", "login1"],
        ),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ],
)
def test_expand_nodelist(nodelist, names):
    assert expand_nodelist(nodelist) == names


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("node[1-2", "expected names like"),
        ("node1-2]", "expected names like"),
        ("a,,b", "expected names like"),
        ("n[4-1]", "runs backwards"),
        ("n[a-b]", "expected a number or a range"),
        ("n[]", "expected a number or a range"),
    ],
)
def test_malformed_nodelists(nodelist, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("16") == [16]
    for bad in ("2(3)", "0", "x", "2(x0)", ""):
        with pytest.raises(ValueError, match="expected N or N\\(xM\\)"):
            expand_tasks_per_node(bad)


def test_slurm_allocation():
    env = {"SLURM_JOB_NODELIST": "node[01-03],gpu1", "SLURM_TASKS_PER_NODE": "2(x3),4"}
    assert hosts_from_environment(env) == [
        Host("node01", 2),
        Host("node02", 2),
        Host("node03", 2),
        Host("gpu1", 4),
    ]


def test_slurm_old_variable_and_no_tasks_per_node():
    assert hosts_from_environment({"SLURM_NODELIST": "n[1-2]"}) == [Host("n1"), Host("n2")]


def test_allocation_agents_on_another_port(tmp_path):
    assert hosts_from_environment({"SLURM_NODELIST": "n[1-2]"}, port=7000) == [Host("n1", port=7000), Host("n2", port=7000)]
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("a\na\nb\n")
    assert hosts_from_environment({"PBS_NODEFILE": str(nodefile)}, port=7001) == [Host("a", 2, port=7001), Host("b", port=7001)]


def test_slurm_count_mismatch_is_reported():
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    expected = r"describes 2 nodes, but SLURM_JOB_NODELIST='n\[1-3\]' names 3"
    with pytest.raises(HostfileError, match=expected):
        hosts_from_environment(env)


def test_slurm_bad_values_name_the_variable():
    with pytest.raises(HostfileError, match=r"^SLURM_JOB_NODELIST='n\[1-'"):
        hosts_from_environment({"SLURM_JOB_NODELIST": "n[1-"})
    with pytest.raises(HostfileError, match=r"^SLURM_TASKS_PER_NODE='x'"):
        hosts_from_environment({"SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "x"})


def test_pbs_nodefile_repeats_become_slots(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("cn01\ncn01\ncn02\ncn01\n")
    hosts = hosts_from_environment({"PBS_NODEFILE": str(nodefile)})
    assert hosts == [Host("cn01", 3), Host("cn02")]


def test_outside_a_batch_job(monkeypatch):
    assert hosts_from_environment({"PATH": "/usr/bin"}) is None
    for variable in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "PBS_NODEFILE"):
        monkeypatch.delenv(variable, raising=False)
    assert hosts_from_environment() is None
