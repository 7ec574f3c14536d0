"""pydra.importcheck: a service's first import of a TARGET, in a child process with a time limit (no MPI)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pydra import target as targets
from pydra.errors import TargetError
from pydra.importcheck import check_in_child

GOOD = "import pydra\n\ndef job():\n    return pydra.Parallel(abs)\n"


def spec_of(path: Path, text: str) -> targets.TargetSpec:
    path.write_text(text)
    return targets.read_target(f"{path}:job")


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether *pid* ends (or is a zombie) within *within* seconds (a SIGKILL takes effect, it is not instant)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_a_good_target_passes(tmp_path: Path) -> None:
    check_in_child(spec_of(tmp_path / "good.py", GOOD), timeout=60)


@pytest.mark.parametrize("body, said", [
    ("import os\nos._exit(7)\n", "ended the process importing it: it exited with status 7 (os._exit at import?)"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "ended the process importing it: it was killed by SIGSEGV"),
    ("raise RuntimeError('no data')\n", "failed to import: RuntimeError: no data"),
    ("def job():\n    return 42\n", "job() returned int, expected a Task"),
])
def test_a_target_that_cannot_load_is_one_line_saying_why(tmp_path: Path, body: str, said: str) -> None:
    with pytest.raises(TargetError) as caught:
        check_in_child(spec_of(tmp_path / "bad.py", body), timeout=60)
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_a_hanging_import_is_cut_off_with_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "forked.pid"
    body = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    time.sleep(600)\n"
            "    os._exit(0)\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "time.sleep(600)\n")
    with pytest.raises(TargetError, match=r"hangs\.py took more than 2 s to import \(PYDRA_IMPORT_TIMEOUT\)$"):
        check_in_child(spec_of(tmp_path / "hangs.py", body), timeout=2)
    assert pid_file.exists() and gone(int(pid_file.read_text()))


def test_what_an_import_forks_does_not_hold_the_check_up_nor_outlive_it(tmp_path: Path) -> None:
    """A process forked at import keeps the result pipe open: reading it to its end waited for that process."""
    pid_file = tmp_path / "forked.pid"
    body = ("import os, time\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    time.sleep(600)\n"
            "    os._exit(0)\n"
            f"open({str(pid_file)!r}, 'w').write(str(child))\n"
            "raise RuntimeError('broken after forking')\n")
    with pytest.raises(TargetError, match="failed to import: RuntimeError: broken after forking"):
        check_in_child(spec_of(tmp_path / "forks.py", body), timeout=60)
    assert gone(int(pid_file.read_text()))
