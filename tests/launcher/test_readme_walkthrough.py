"""The README's "A first launch on three lab machines", run word for word on three simulated machines.

Each machine is a home directory of its own holding a copy of this
repository's files at ``~/pydra`` (what a fresh clone holds) and a loopback
address; the README's addresses ``10.1.0.11``-``13`` become ``127.0.0.X`` with
X picked at random (port 7470 must be free on it) and its lab network
``10.1.0.0/24`` becomes ``127.0.0.0/24``. Every ``bash`` block of the section
runs as written, in ``bash -e``, where its first line says (``# on node1``,
``# on every machine``), with ``HOST`` set to the machine's address and only
the system's ``PATH``, so the Pydra each machine installs is the one that
runs. Two stand-ins play what one machine cannot: ``scp`` copies between the
home directories, and ``systemctl --user enable --now pydra-node`` starts the
unit's ``ExecStart`` as systemd would; node3 starts its agent that way, node1
and node2 with the plain command. The install uses pip's configured indexes
and this user's pip cache (so packages are downloaded once, not per machine
and run). The test ends with the launch of the word
count on the three agents, and stops every agent by the pid it recorded.
"""

from __future__ import annotations

import collections
import json
import os
import pwd
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentkit import alive
from testkit import ROOT, run_process

SECTION = "### A first launch on three lab machines"
README_ADDRESSES = ["10.1.0.11", "10.1.0.12", "10.1.0.13"]
LAB_NETWORK = "10.1.0.0/24"
AGENT_PORT = 7470
WHERE = re.compile(r"# on (node1|every machine)(?:, (with|without) systemd)?\b")
INSTALL_TIMEOUT = 600  # a venv and pip install from a local index, on a loaded 2-core machine
STEP_TIMEOUT = 180  # any other block, the launch included
START_TIMEOUT = 60  # an agent writing "listening" to its log
WORD = re.compile(r"[a-z']+")
USER = pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class Block:
    """One ``bash`` block of the section and where it runs."""

    where: str  #: "node1" or "every machine"
    variant: str | None  #: "with" or "without" systemd, or None
    script: str


@dataclass
class Machine:
    name: str
    address: str
    home: Path
    systemd: bool  #: starts its agent with the user unit (through the systemctl stand-in)


def section_blocks() -> list[Block]:
    """The section's ``bash`` blocks, each with the place its first line names."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n#", start + len(SECTION))
    blocks = []
    for body in re.findall(r"^ *```bash\n(.*?)^ *```$", text[start:end], re.S | re.M):
        script = textwrap.dedent(body)
        match = WHERE.match(script)
        assert match, f"a block of the walkthrough does not say where it runs:\n{script}"
        blocks.append(Block(match.group(1), match.group(2), script))
    return blocks


def pick_addresses() -> list[str]:
    """Three loopback addresses on which the agent's default port is free."""
    free = []
    for last in random.sample(range(16, 255), 60):
        address = f"127.0.0.{last}"
        try:
            with socket.create_server((address, AGENT_PORT)):
                free.append(address)
        except OSError:
            continue
        if len(free) == 3:
            return free
    pytest.skip(f"port {AGENT_PORT} is taken on too many loopback addresses")


def copy_repository(home: Path) -> None:
    """What a fresh clone holds, at ``home/pydra``: the repository's files as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, home / "pydra" / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode & 0o777)


def write_stand_ins(directory: Path, machines: list[Machine]) -> None:
    """``scp`` between the machines' homes, and a ``systemctl --user`` that starts the unit's command."""
    directory.mkdir()
    cases = "".join(f'  {m.address}) home={m.home} ;;\n' for m in machines)
    scp = directory / "scp"
    scp.write_text(
        "#!/bin/bash\n# scp SOURCE HOST:PATH between the simulated machines' home directories\nset -e\n"
        'host=${2%%:*}\ncase $host in\n' + cases + '  *) echo "scp: unknown host $host" >&2; exit 1 ;;\nesac\n'
        'cp "$1" "$home/${2#*:}"\n'
    )
    systemctl = directory / "systemctl"
    systemctl.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        # systemctl --user for one unit: daemon-reload does nothing, enable --now starts ExecStart as systemd would
        import os, subprocess, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from unitkit import exec_start
        home = Path(os.environ["HOME"])
        if sys.argv[1:] == ["--user", "daemon-reload"]:
            sys.exit(0)
        if sys.argv[1:] != ["--user", "enable", "--now", "pydra-node"]:
            sys.exit(f"systemctl stand-in: unexpected {{sys.argv[1:]}}")
        argv = exec_start(home / ".config" / "systemd" / "user" / "pydra-node.service", home)
        agent = subprocess.Popen(argv, cwd=home, start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (home / "systemd-stand-in.pid").write_text(f"{{agent.pid}}\\n")
        """))
    for stand_in in (scp, systemctl):
        stand_in.chmod(0o755)


def pip_cache() -> dict[str, str]:
    """This user's pip cache, shared by the machines: packages come from it rather than again from an index."""
    found = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    return {"PIP_CACHE_DIR": found.stdout.strip()} if found.returncode == 0 and found.stdout.strip() else {}


def environment(machine: Machine, stand_ins: Path) -> dict[str, str]:
    """A login's environment on *machine*: the system's PATH, this machine's home, pip's own settings and cache."""
    env = {name: value for name, value in os.environ.items() if name.startswith("PIP_")}
    env.update(pip_cache())
    env.update(
        HOME=str(machine.home), HOST=machine.address, USER=USER, LOGNAME=USER, LANG="C.UTF-8",
        PATH=f"{stand_ins}:/usr/local/bin:/usr/bin:/bin",
    )
    return env


def run_block(block: Block, machine: Machine, stand_ins: Path, addresses: dict[str, str]):
    script = block.script
    for readme, simulated in addresses.items():
        script = script.replace(readme, simulated)
    assert "10.1.0." not in script, script
    timeout = INSTALL_TIMEOUT if "pip install" in script else STEP_TIMEOUT
    done = run_process(["bash", "-e", "-o", "pipefail", "-c", script], timeout=timeout,
                       cwd=machine.home, env=environment(machine, stand_ins), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"on {machine.name}:\n{script}\nexit {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def agent_pids(machine: Machine) -> list[int]:
    """The agents started on *machine*: by their pid files, only if still running Pydra from this home."""
    pids = []
    for pid_file in (machine.home / ".pydra" / "node.pid", machine.home / "systemd-stand-in.pid"):
        try:
            pid = int(pid_file.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if str(machine.home) in command and pid not in pids:
            pids.append(pid)
    return pids


def stop_agents(machines: list[Machine]) -> None:
    pids = [pid for machine in machines for pid in agent_pids(machine)]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in filter(alive, pids):
        os.kill(pid, signal.SIGKILL)


def wait_until_listening(machine: Machine) -> None:
    log = machine.home / ".pydra" / "node.log"
    deadline = time.monotonic() + START_TIMEOUT
    while "listening" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"the agent on {machine.name} did not start:\n" + (
            log.read_text() if log.exists() else "no log")
        time.sleep(0.1)


@pytest.mark.slow
def test_the_readme_takes_three_fresh_machines_to_a_first_launch(tmp_path: Path) -> None:
    blocks = section_blocks()
    assert {block.variant for block in blocks} == {None, "with", "without"}, "both ways to start the agents"
    simulated = pick_addresses()
    addresses = {LAB_NETWORK: "127.0.0.0/24", **dict(zip(README_ADDRESSES, simulated))}
    machines = [Machine(f"node{i + 1}", address, tmp_path / f"node{i + 1}" / "home", systemd=i == 2)
                for i, address in enumerate(simulated)]
    for machine in machines:
        machine.home.mkdir(parents=True)
        copy_repository(machine.home)
    stand_ins = tmp_path / "bin"
    write_stand_ins(stand_ins, machines)
    outputs: dict[tuple[int, str], str] = {}
    try:
        for number, block in enumerate(blocks):
            targets = machines[:1] if block.where == "node1" else machines
            if block.variant is not None:
                targets = [m for m in targets if m.systemd == (block.variant == "with")]
            for machine in targets:
                if "pydra node --check" in block.script:
                    wait_until_listening(machine)  # the admin's pace: the agent has started by then
                done = run_block(block, machine, stand_ins, addresses)
                outputs[number, machine.name] = done.stdout + done.stderr
        checks = [text for (number, _), text in outputs.items() if "pydra node --check" in blocks[number].script]
        assert len(checks) == 3, outputs.keys()
        for machine, text in zip(machines, checks):
            lines = text.splitlines()
            assert lines[-1] == "pydra node --check: all is well", text
            assert any(f"ok: {machine.address}:{AGENT_PORT} is held by the running agent (pid" in line
                       for line in lines), text
        launch = outputs[len(blocks) - 1, "node1"]
        for machine in machines:
            assert re.search(rf"^{re.escape(machine.address)}\s.*\sok$", launch, re.M), launch
        assert "finished" in launch, launch
    finally:
        stop_agents(machines)
    files = sorted((ROOT / "examples" / "data").glob("*.txt"))
    expected = collections.Counter(w for f in files for w in WORD.findall(f.read_text().lower()))
    assert json.loads((machines[0].home / "counts.json").read_text()) == dict(expected)
    agent_log = (machines[2].home / ".pydra" / "node.log").read_text()
    assert agent_log.count("accepted SHA256:") == 2, agent_log  # node3's unit-started agent: the ping and the job
