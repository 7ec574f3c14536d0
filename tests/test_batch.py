"""pydra.batch: how `pydra run -n` and `pydra launch` wait for mpiexec and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from testkit import ROOT, stop_group

#: a stand-in for an mpiexec that does not end when told to stop: it says so, and ends at the second stop
STUBBORN = ("import signal, sys, time\n"
            "stops = []\n"
            "def stop(*_):\n"
            "    stops.append(1)\n"
            "    print('told', flush=True)\n"
            "    if len(stops) > 1: sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "while True: time.sleep(1)\n")

#: the launcher's side: wait_for with a short hard-stop margin, so the test waits seconds, not 15
LAUNCHER = ("import os, sys\n"
            "from pydra import batch\n"
            "batch.HARD_STOP_MARGIN = 0.5\n"
            "status = batch.wait_for([sys.executable, '-c', sys.argv[1]], dict(os.environ))\n"
            "print('status', status, flush=True)\n")


def stopped_once(script: list[str], first_line: str) -> tuple[str, str]:
    """Run ``python -c *script`` as a launcher under ``PYDRA_STOP_GRACE=1``, stop it once when it prints *first_line*.

    What it prints after, and its stderr.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYDRA_STOP_GRACE": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", *script], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert launcher.stdout.readline() == first_line
        launcher.send_signal(signal.SIGTERM)  # once: the next stop must be the launcher's own, after 1 + 0.5 s
        # With the default grace of 30 s, or no hard stop at all, it would wait past this timeout.
        return launcher.communicate(timeout=25)
    finally:
        stop_group(launcher)


def test_an_mpiexec_that_does_not_stop_is_stopped_hard_after_the_ranks_grace() -> None:
    stdout, stderr = stopped_once([LAUNCHER, STUBBORN], "ready\n")
    assert stdout == "told\ntold\nstatus 143\n", stderr


#: the same launcher, stopped while mpiexec starts: the child says so, then takes its time before it is mpiexec
WHILE_STARTING = ("import os, signal, sys, time\n"
                  "from pydra import batch\n"
                  "batch.HARD_STOP_MARGIN = 0.5\n"
                  "def starting():\n"
                  "    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (kept through exec: it hears no stop)\n"
                  "    os.write(1, b'starting\\n')\n"
                  "    time.sleep(2)\n"
                  "def stop_hard(process):\n"
                  "    print('stopped hard', flush=True)\n"
                  "    process.kill()\n"
                  "status = batch.wait_for([sys.executable, '-c', 'import time; time.sleep(600)'], dict(os.environ),\n"
                  "                        preexec_fn=starting, stop_hard=stop_hard)\n"
                  "print('status', status, flush=True)\n")


def test_a_stop_while_mpiexec_starts_is_passed_on_and_stopped_hard_after_the_grace_too() -> None:
    stdout, stderr = stopped_once([WHILE_STARTING], "starting\n")  # stopped in Popen, waiting for the exec
    assert stdout == "stopped hard\nstatus 143\n", stderr
