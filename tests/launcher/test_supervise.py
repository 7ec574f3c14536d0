"""The rank supervisor (pydra/launcher/supervise.py), without MPI: the rank is a small Python child.

Run as a child of this test, the supervisor's parent (the launcher's proxy in
a real job) is the test process, so the test can listen where a rank 0 of
the same job on the same host would.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import ROOT
from userkit import User, other_user  # noqa: F401  (other_user is a fixture the tests ask for)

from pydra.launcher.supervise import STOP_GRACE, DeathNotices, tell_rank_zero


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_what_was_started():
    """Whatever a failing test leaves running is stopped by its process group (supervisor and rank)."""
    yield
    while _started:
        child = _started.pop()
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


#: what a rank says once its start-up is over (pydra.startup.joined): the rank of these tests is past it
JOINED = "import os; os.write(int(os.environ['PYDRA_STARTUP_FD']), b'joined\\n')\n"
#: what it says once its session is over (pydra.startup.left)
LEFT = "import os; os.write(int(os.environ['PYDRA_STARTUP_FD']), b'left\\n')\n"


def supervised(rank: int, code: str, **settings: str) -> subprocess.Popen:
    """``python -m pydra.launcher.supervise python -c CODE`` as rank *rank*, past its start-up, in a session of its own.

    *settings* are ``PYDRA_*`` variables for the supervisor and its rank (``STOP_GRACE="2"``).
    """
    env = {**os.environ, "PMI_RANK": str(rank), "PYTHONPATH": str(ROOT),
           **{f"PYDRA_{name}": value for name, value in settings.items()}}
    child = subprocess.Popen([sys.executable, "-m", "pydra.launcher.supervise", sys.executable, "-c", JOINED + code], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _started.append(child)
    return child


def notices() -> DeathNotices:
    return DeathNotices(f"pydra-death-notices-{os.getuid()}-{os.getpid()}")


def test_a_worker_killed_by_a_signal_is_told_to_rank_zero_and_ends_the_supervisor_well() -> None:
    with_rank_zero = notices()
    try:
        child = supervised(2, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0  # a worker: the job goes on without it
        assert "pydra: rank 2" in stderr and "was killed by SIGKILL" in stderr
        assert with_rank_zero.take() == [(2, "was killed by SIGKILL")]
        child = supervised(1, LEFT + "pass")
        child.communicate(timeout=60)
        assert child.returncode == 0 and with_rank_zero.take() == []  # a worker's normal end is no news
    finally:
        with_rank_zero.close()


def test_a_worker_that_exits_with_a_status_in_its_session_is_lost_and_its_status_is_not_the_jobs() -> None:
    """A task's ``os._exit(3)``: rank 0 hears of it and carries on; the job's status is rank 0's."""
    with_rank_zero = notices()
    try:
        child = supervised(1, "import os; os._exit(3)")
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0 and with_rank_zero.take() == [(1, "exited with status 3")]
        assert stderr == ""  # rank 0 says which worker it lost
        child = supervised(0, LEFT + "raise SystemExit(3)")
        child.communicate(timeout=60)
        assert child.returncode == 3 and with_rank_zero.take() == []  # rank 0's status is the job's
        child = supervised(0, "import os; os._exit(3)")  # unless it ended from inside the job: a failure
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 1 and "exited with status 3 in the middle of the job" in stderr
    finally:
        with_rank_zero.close()


def test_an_exit_0_in_the_session_is_a_lost_worker_or_an_unfinished_job() -> None:
    """A task's ``os._exit(0)``: a worker is lost (rank 0 hears at once); rank 0 gone that way is no success."""
    with_rank_zero = notices()
    try:
        child = supervised(1, "import os; os._exit(0)")
        child.communicate(timeout=60)
        assert child.returncode == 0 and with_rank_zero.take() == [(1, "exited with status 0")]
        child = supervised(0, "import os; os._exit(0)")
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 1
        assert stderr.startswith("pydra: rank 0 (pid ") and "exited with status 0 in the middle of the job" in stderr
        child = supervised(0, LEFT + "pass")  # the session ended, then the program
        assert child.communicate(timeout=60) == ("", "") and child.returncode == 0
    finally:
        with_rank_zero.close()


def test_once_out_of_its_session_a_worker_ends_with_its_own_status() -> None:
    """After ``left`` (a script's code after its Executor, a job's agreed end) the status is the program's."""
    with_rank_zero = notices()
    try:
        child = supervised(1, LEFT + "raise SystemExit(3)")
        child.communicate(timeout=60)
        assert child.returncode == 3 and with_rank_zero.take() == []
        child = supervised(1, LEFT + JOINED + "raise SystemExit(4)")  # a second session: lost again
        child.communicate(timeout=60)
        assert child.returncode == 0 and with_rank_zero.take() == [(1, "exited with status 4")]
    finally:
        with_rank_zero.close()


def test_a_rank_stopped_by_a_signal_it_was_passed_ends_without_a_word() -> None:
    with_rank_zero = notices()
    try:
        child = supervised(1, "import time; print('ready', flush=True); time.sleep(120)")
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 128 + signal.SIGTERM and stderr == ""
        assert with_rank_zero.take() == []  # the job is being stopped: no worker is lost
    finally:
        with_rank_zero.close()


#: a rank that says when it is told to stop, and does not stop
DEAF = ("import signal, time; signal.signal(signal.SIGTERM, lambda *_: print('told', flush=True)); "
        "print('ready', flush=True)\nwhile True: time.sleep(600)")


def test_a_rank_that_does_not_stop_when_told_is_killed_after_its_grace() -> None:
    child = supervised(1, DEAF, STOP_GRACE="2")
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    # Within the default grace of 30 s only if PYDRA_STOP_GRACE counts; not the 600 s the rank would take.
    stdout, stderr = child.communicate(timeout=STOP_GRACE - 5)
    assert child.returncode == 128 + signal.SIGKILL and stderr == ""
    assert stdout == "told\n"  # it was told first


def test_a_rank_told_to_stop_has_its_grace() -> None:
    child = supervised(1, DEAF, STOP_GRACE="600")
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline() == "told\n"
    time.sleep(1)
    assert child.poll() is None  # the supervisor waits for it (600 s): it passed the stop on, no more
    child.send_signal(signal.SIGTERM)  # a second stop: killed at once
    _, stderr = child.communicate(timeout=STOP_GRACE / 2)
    assert child.returncode == 128 + signal.SIGKILL and stderr == ""


def test_the_supervisor_and_the_settings_table_agree_on_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor imports nothing of Pydra, so it keeps its own default and reading of ``PYDRA_STOP_GRACE``."""
    from pydra.config import SETTINGS
    from pydra.launcher.supervise import stop_grace

    assert SETTINGS["STOP_GRACE"].default == STOP_GRACE
    for text, seconds in [("", STOP_GRACE), ("2.5", 2.5), ("0", STOP_GRACE), ("-1", STOP_GRACE), ("soon", STOP_GRACE),
                          ("inf", STOP_GRACE), ("nan", STOP_GRACE)]:
        monkeypatch.setenv("PYDRA_STOP_GRACE", text)
        assert stop_grace() == seconds, text


def test_a_second_stop_kills_the_rank_at_once() -> None:
    """A second Ctrl-C stops at once (the README's promise): the supervisor does not wait out STOP_GRACE."""
    child = supervised(1, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(600)")
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=STOP_GRACE / 2)  # (the supervisor is killed by the fixture if not)
    assert child.returncode == 128 + signal.SIGKILL and stderr == ""


def test_a_rank_still_starting_is_killed_at_once_when_stopped() -> None:
    """Stopped in start-up (it said no `joined`), a rank has nothing to save, and may be deaf to signals in
    MPI's start-up, waiting for a rank already gone (Ctrl-C then took 30 s and said nothing)."""
    env = {**os.environ, "PMI_RANK": "1", "PYTHONPATH": str(ROOT)}
    code = ("import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "os.write(int(os.environ['PYDRA_STARTUP_FD']), b'bcast-spec\\n'); print('ready', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-m", "pydra.launcher.supervise", sys.executable, "-c", code], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _started.append(child)
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=STOP_GRACE / 2)
    assert child.returncode == 128 + signal.SIGKILL and stderr == ""  # stopped: no "lost during start-up" line


#: a rank lost during start-up: it reports a step (pydra.startup), then exits without a word
LOST_AT_START_UP = "import os; os.write(int(os.environ['PYDRA_STARTUP_FD']), b'bcast-spec\\n'); os._exit(3)"


def test_a_rank_lost_at_start_up_is_dead_by_the_time_its_pipes_close() -> None:
    """Hydra's proxy looks for a dead child (waitpid, WNOHANG) once per piece of news on its pipes, and
    nothing else wakes it: a supervisor that ends the job by dying must be a zombie by the time the last
    of its pipes closes, or the job hangs. Here it runs as the proxy would see it at worst: on this test's
    CPU at the lowest priority, so that its pipes' closing wakes this test at once (without the witness
    the supervisor forks, 195 of 200 such deaths were not visible yet)."""
    kept = os.sched_getaffinity(0)
    cpu = min(kept)
    env = {**os.environ, "PMI_RANK": "2", "PYTHONPATH": str(ROOT)}
    os.sched_setaffinity(0, {cpu})
    try:
        for _ in range(20):
            child = subprocess.Popen(
                [sys.executable, "-m", "pydra.launcher.supervise", sys.executable, "-c", LOST_AT_START_UP],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=lambda: (os.nice(19), os.sched_setaffinity(0, {cpu})))
            _started.append(child)
            said = read_to_the_end(child.stdout, child.stderr)
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            assert pid == child.pid, "the supervisor's pipes closed before it was dead"
            child.returncode = -os.WTERMSIG(status)
            assert child.returncode == -signal.SIGKILL
            assert said.decode().startswith("pydra: rank 2 (pid "), said
    finally:
        os.sched_setaffinity(0, kept)


def read_to_the_end(*pipes) -> bytes:
    """All that *pipes* carry, once every one of them is closed at its other end, as Hydra's proxy reads them."""
    said, open_ = b"", list(pipes)
    while open_:
        ready, _, _ = select.select(open_, [], [], 60)
        assert ready, "a pipe stayed open"
        for pipe in ready:
            chunk = os.read(pipe.fileno(), 65536)
            said += chunk
            if not chunk:
                open_.remove(pipe)
    return said


def test_rank_zero_hears_only_well_formed_notices() -> None:
    with_rank_zero = notices()
    try:
        address = f"pydra-death-notices-{os.getuid()}-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for junk in (b"", b"two killed", b"\xff\xfe", b"-1 gone"):
                sock.sendto(junk, "\0" + address)
        tell_rank_zero(address, 3, "killed by SIGSEGV")
        assert with_rank_zero.take() == [(3, "killed by SIGSEGV")]
        tell_rank_zero("pydra-death-notices-nobody-listens", 1, "killed by SIGKILL")  # no error: best effort
    finally:
        with_rank_zero.close()


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a Python the other user may run")
def test_rank_zero_does_not_hear_another_user(other_user: User) -> None:
    with_rank_zero = notices()
    try:
        address = f"pydra-death-notices-{os.getuid()}-{os.getpid()}"
        code = ("import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"
                f".sendto(b'1 killed', {chr(0) + address!r})")
        done = subprocess.run(["/usr/bin/python3", "-c", code], user=other_user.uid, group=other_user.gid,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr  # it could send...
        tell_rank_zero(address, 2, "killed by SIGKILL")
        assert with_rank_zero.take() == [(2, "killed by SIGKILL")]  # ...but only this user was heard
    finally:
        with_rank_zero.close()
