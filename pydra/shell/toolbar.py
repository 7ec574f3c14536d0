"""The shell's bottom toolbar: the cluster's health, refreshed in the background.

A thread asks the cluster for its status every second and keeps the last
answer, so drawing the toolbar (which prompt-toolkit does on every redraw)
never waits on the network. The same poll feeds completion's job ids and
ranks, and reports a job's end above the prompt.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from pydra.shell.completer import ClusterFacts

#: seconds between two polls of the cluster
POLL_SECONDS = 1.0


class Toolbar:
    """Callable bottom toolbar; :meth:`start` begins polling *client*."""

    def __init__(self, client: Any, facts: ClusterFacts, announce: Callable[[str], None]) -> None:
        self.client = client
        self.facts = facts
        self.announce = announce  # prints above the prompt (under patch_stdout)
        self.status: dict | None = None
        self.problem: str | None = None
        self._states: dict[int, str] = {}
        self._looked = False  # whether a refresh has seen the jobs: what had ended before that is no news
        self._lock = threading.Lock()
        self._held: list[str] | None = None  # announcements kept back (see held)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="pydra-shell-toolbar", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def __call__(self) -> str:
        if self.problem:
            return f" cluster unreachable: {self.problem}"
        status = self.status
        if status is None:
            return " connecting..."
        workers = status["workers"]
        paused = "  QUEUE PAUSED" if status["paused"] else ""
        return (
            f" {status['cluster']}  ranks {status['ranks']}  workers: {workers['idle']} idle, {workers['busy']} busy,"
            f" {workers['lost']} lost  jobs: {status['queued']} queued, {status['running']} running,"
            f" {status['done']} done, {status['failed']} failed{paused}"
        )

    def refresh(self) -> None:
        """Ask the cluster now (the poll thread does this every second)."""
        try:
            self.status = self.client.call("status")
            jobs = self.client.call("jobs", everything=True)
            workers = self.client.call("workers")
        except Exception as exc:  # noqa: BLE001 - shown in the toolbar, never raised at the prompt
            self.problem = str(exc)
            return
        self.problem = None
        self.facts.job_ids = [job["id"] for job in jobs]
        self.facts.ranks = [worker["rank"] for worker in workers]
        for job in jobs:
            # A job first seen already ended is news too: it was submitted and ran between two polls.
            if self._looked and self._states.get(job["id"]) != job["state"] and job["state"] in ("done", "failed"):
                self._announce(f"job {job['id']} ({job['target']}) {job['state']}")
            self._states[job["id"]] = job["state"]
        self._looked = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep announcements back while the caller draws on the terminal itself (``progress``); then say them."""
        with self._lock:
            self._held = []
        try:
            yield
        finally:
            with self._lock:
                held, self._held = self._held or [], None
            for text in held:
                self.announce(text)

    def _announce(self, text: str) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(text)
                return
        self.announce(text)

    def _poll(self) -> None:
        while not self._stopped.is_set():
            self.refresh()
            self._stopped.wait(POLL_SECONDS)
