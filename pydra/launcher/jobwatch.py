"""What a launcher makes of mpiexec's stderr as it relays it: :class:`JobWatch`.

``pydra launch`` and ``pydra run -n`` both pass mpiexec's stderr through one
(:func:`pydra.batch.wait_for`): it notices a start-up loss that ends the job,
and the line that says how to resume it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

from pydra.launcher import proctree


class JobWatch:
    """Watches mpiexec's stderr as :func:`~pydra.batch.wait_for` relays it.

    - A rank lost during start-up has its supervisor print a line
      ``pydra: rank N ... during start-up, ...; ending the job``
      (:mod:`pydra.launcher.supervise`, :mod:`pydra.startup`).
      Hydra ends a job only on the proxy that lost the rank: the ranks on the
      other hosts would wait for it in MPI's start-up forever. The line makes
      ``ends_job`` true, and :meth:`stop_proxies` (given to ``wait_for``) stops
      the job at once.
    - Under ULFM prterun exits 0 for a job it stopped because a daemon was lost
      (a rank lost on a prted's host ends the job so: its supervisor stops that
      prted), and for ranks that died by a signal. What it prints then is all
      there is to see on this host: the start-up loss's line, or PRRTE's own
      about a lost daemon.
    - Rank 0's first line says how to resume the job; if the job is stopped
      and rank 0's last word is lost (with its host, or dropped by prterun),
      or the job ends before it finished without a word, :meth:`conclude`
      says it.
    - Once the job is being stopped, or is ending over a start-up loss,
      Hydra's ``[mpiexec@host] ...`` error lines only say that its proxies
      went away: they are dropped.
    """

    #: the line that says a start-up loss ends the job (pydra.launcher.supervise, pydra.startup), whole: a
    #: task's own line that merely ends the same way must not stop the job
    START_UP_LOSS = re.compile(rb"^pydra: ranks? [\d, ]+ .*during start-up, .*; ending the job$")
    #: the start of PRRTE's paragraph about a daemon it lost
    LOST_DAEMON = b"PRTE has lost communication with a remote daemon"
    #: rank 0's first line (pydra.batch) and its last on an interrupt (pydra.interrupts)
    RESUME = re.compile(rb"^pydra: run directory .* \(resume with: (.*)\)$")
    TOLD = b"pydra: interrupted; resume with: "

    def __init__(self) -> None:
        self.ends_job = False
        self._lost_daemon = False  # PRRTE said it lost a host's daemon (its paragraph names no job to resume)
        self.stopping = False
        self.resume: str | None = None
        self._told = False
        self._line = b""  # the start of a line not yet seen whole
        self._passed = 0  # how much of it was passed on already

    def __call__(self, chunk: bytes) -> bytes:
        *lines, rest = (self._line + chunk).split(b"\n")
        for line in lines:
            self._lost_daemon = self._lost_daemon or self.LOST_DAEMON in line
            self.ends_job = self.ends_job or bool(self.START_UP_LOSS.match(line)) or self._lost_daemon
            self._told = self._told or self.TOLD in line
            if self.resume is None and (found := self.RESUME.match(line)):
                self.resume = found.group(1).decode(errors="replace")
        if not (self.stopping or self.ends_job):
            self._line, self._passed = rest, len(rest)
            return chunk
        # Whole lines only from here on (Hydra writes its prefix and its message apart).
        kept = []
        for i, line in enumerate(lines):
            passed = self._passed if i == 0 else 0  # (the start of a line may have gone before we stopped)
            if passed or not line.startswith(b"[mpiexec@"):
                kept.append(line[passed:] + b"\n")
        if lines:
            self._passed = 0
        self._line = rest
        return b"".join(kept)

    def conclude(self, status: int) -> int:
        """The launcher's exit status for mpiexec's *status*, after saying what rank 0 could not.

        - A start-up loss ended the job: its supervisor said so in one line; 1.
        - Rank 0's own status (at most 128): rank 0 said how the job ended.
        - Stopped by the user (Ctrl-C): if rank 0's last word, how to resume,
          was lost (with its host, or dropped by prterun), it is said here.
        - Otherwise the job ended before it finished, and nobody said so: a
          rank 0 killed (128 + its signal), or Hydra's own failure (255, 1
          here) when a host's agent or MPI proxy went away. Said, with how to
          resume.
        """
        resume = f"; resume with: {self.resume}" if self.resume is not None else ""
        if self.ends_job:
            if self._lost_daemon:  # (a start-up loss's supervisor has said its line)
                print(f"pydra: the job ended before it finished (a host's MPI daemon was lost){resume}",
                      file=sys.stderr)
            return 1
        if status <= 128:
            return status
        if self.stopping:
            if not self._told and resume:
                print(f"pydra: interrupted{resume}", file=sys.stderr)
            return status
        print(f"pydra: the job ended before it finished (mpiexec's status {status}: rank 0, or a host's agent "
              f"or MPI proxy, was lost){resume}", file=sys.stderr)
        return 1 if status == 255 else status

    def stop_proxies(self, mpiexec: subprocess.Popen) -> None:
        """Stop a Hydra job at once, everywhere: stop every host's ``pydra-remote-exec``.

        Each one's agent then kills its host's proxy and ranks, and mpiexec,
        its proxies gone, ends. (Hydra cannot be told: with a proxy already
        gone it fails writing to it, and gives up on the others.)
        """
        self.stopping = True
        for pid in proctree.children(mpiexec.pid) or [mpiexec.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
