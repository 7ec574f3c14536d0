"""The interactive shell in a real terminal (a pty, through pexpect) against a real 4-rank cluster.

Tab completes a command, a command answers above the prompt, bad input
gives one line and the prompt again, the bottom toolbar shows the cluster's
health, a job that ends is announced, ``progress`` redraws its bar in place,
and ``exit`` leaves with status 0.
"""

from __future__ import annotations

import re
import sys

import pexpect
from clusterkit import NAPS, ROOT, SQUARES, Cluster

#: what prompt-toolkit asks a terminal (where is the cursor?) and a terminal's answer
CURSOR_QUESTION, CURSOR_ANSWER = "\x1b[6n", "\x1b[1;1R"
#: any run of terminal control sequences (prompt-toolkit draws only what changed, between them)
ESCAPES = "(?:\x1b\\[[0-9;?]*[A-Za-z])*"


def expect(shell: pexpect.spawn, pattern: str, timeout: float = 20) -> re.Match:
    """Wait for *pattern* (a regex), answering the cursor-position questions a real terminal would."""
    while True:
        if shell.expect([re.escape(CURSOR_QUESTION), pattern], timeout=timeout) == 1:
            return shell.match
        shell.send(CURSOR_ANSWER)


def test_the_interactive_shell_in_a_terminal(cluster: Cluster) -> None:
    argv = ["-m", "pydra", "shell", "--connect", str(cluster.connection_file), "-i", str(cluster.identity)]
    env = {**cluster.env, "TERM": "xterm", "PYDRA_HOME": str(cluster.home)}
    shell = pexpect.spawn(sys.executable, argv, cwd=str(ROOT), env=env, dimensions=(30, 160), timeout=20,
                          encoding="utf-8")
    try:
        expect(shell, "pydra>")
        expect(shell, "ranks 4  workers: \\d+ idle")  # the bottom toolbar, drawn under the prompt
        shell.send("stat\t")  # Tab completes the command name: the terminal gets "us" after "stat"
        expect(shell, "stat" + ESCAPES + "us")
        shell.send("\r")
        expect(shell, "ranks +4 on ")
        shell.sendline("bogus")
        expect(shell, re.escape("error: unknown command 'bogus': type help for the list"))
        shell.sendline("job notanumber")
        expect(shell, re.escape("error: job: argument ID: invalid int value: 'notanumber'"))
        shell.sendline(f"submit {SQUARES} 1 2 3")
        job_id = expect(shell, "submitted job (\\d+)").group(1)
        expect(shell, f"job {job_id} \\(.*\\) done", timeout=30)  # announced above the prompt
        shell.sendline(f"submit {NAPS} " + " 0.5" * 12)
        job_id = expect(shell, "submitted job (\\d+)").group(1)
        shell.sendline(f"progress {job_id}")
        # The bar is drawn over itself (cursor up one line, line cleared), not on a new line each time.
        expect(shell, re.escape(f"\x1b[1A\r\x1b[2Kjob {job_id} "), timeout=30)
        expect(shell, re.escape(f"job {job_id} done [") + "#+" + re.escape("] 12/12 100%"), timeout=60)
        expect(shell, "pydra>")
        shell.sendline("exit")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)
    assert shell.exitstatus == 0, shell.before
    assert (cluster.home / "shell_history").read_text().count("bogus") == 1
