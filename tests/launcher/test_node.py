"""``pydra node``'s command line: what it refuses before it listens (its serving is tested through launches)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import run_process

from pydra.launcher.hostfile import DEFAULT_AGENT_PORT
from pydra.launcher.node import parse_address


@pytest.mark.parametrize("text, address", [
    ("127.0.0.5:7471", ("127.0.0.5", 7471)),
    ("127.0.0.5", ("127.0.0.5", DEFAULT_AGENT_PORT)),
    (":7471", ("127.0.0.1", 7471)),
    ("::1", ("::1", DEFAULT_AGENT_PORT)),  # was host ':' and port 1
    ("[::1]", ("::1", DEFAULT_AGENT_PORT)),
    ("[::1]:7471", ("::1", 7471)),
])
def test_listen_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["127.0.0.5:99999", "127.0.0.5:0", "127.0.0.5:-1", "127.0.0.5:x"])
def test_a_port_out_of_range_is_refused(text: str) -> None:
    """99999 listened on 34463 (the socket takes it modulo 65536) and logged 99999."""
    with pytest.raises(argparse.ArgumentTypeError, match="a port from 1 to 65535"):
        parse_address(text)


def test_a_log_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "no" / "such" / "node.log"
    done = run_process([sys.executable, "-m", "pydra", "node", "--listen", "127.0.0.1:1", "--log", str(log)], timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"pydra node: error: --log {log}: no such directory {log.parent}"]


def test_a_pid_file_of_a_running_agent_is_not_taken_over(tmp_path: Path) -> None:
    """Two agents on one --pid-file: the second overwrote it, and the first, stopping, removed the second's."""
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pydra-node-stand-in"])
    try:
        pid_file = tmp_path / "agent.pid"
        pid_file.write_text(f"{stand_in.pid}\n")
        done = run_process([sys.executable, "-m", "pydra", "node", "--listen", "127.0.0.1:1", "--pid-file", str(pid_file)],
                           timeout=60)
        assert done.returncode == 2
        assert done.stderr.splitlines() == [f"pydra node: error: --pid-file {pid_file} names a running process (pid "
                                            f"{stand_in.pid}), another agent's: stop it, or give this one another pid file"]
        assert pid_file.read_text() == f"{stand_in.pid}\n"
    finally:
        stand_in.kill()
        stand_in.wait()
