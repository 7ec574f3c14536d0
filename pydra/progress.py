"""Progress of long work: a bar on a terminal, plain periodic lines elsewhere.

:func:`progress_text` formats one report (``pydra shell``'s ``progress``
uses it too); :class:`ProgressReporter` is the thread rank 0 runs next to a
``pydra run`` job. ``PYDRA_PROGRESS`` chooses: ``bar``, ``lines`` or
``off``; by default a bar when stderr is a terminal, else lines.
``pydra run -n`` and ``pydra launch`` decide for the ranks they start,
since a rank's stderr is a pipe to the launcher even when you watch it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from pydra.config import setting

#: seconds before the first report: quick jobs print none
QUIET_SECONDS = 1.0
#: seconds between two reports as a bar, and as lines
BAR_SECONDS, LINE_SECONDS = 0.25, 10.0


def progress_mode(stream: TextIO = sys.stderr) -> str:
    """``bar``, ``lines`` or ``off``: ``PYDRA_PROGRESS``, else by whether *stream* is a terminal."""
    return setting("PROGRESS") or ("bar" if stream.isatty() else "lines")


def progress_text(done: int, total: int | None, rate: float | None, width: int = 30) -> str:
    """``[#########.....] 300/1000 30%  120/s  ETA 6s``, or ``300 items  120/s`` without a total.

    *rate* None (not measured yet: a first look) leaves the rate and the ETA out.
    """
    speed = "" if rate is None else f"  {rate:,.0f}/s"
    if not total:
        return f"{done} items{speed}"
    filled = int(width * min(done, total) / total)
    bar = "#" * filled + "." * (width - filled)
    eta = f"  ETA {_duration((total - done) / rate)}" if rate and done < total else ""
    return f"[{bar}] {done}/{total} {100 * done // total}%{speed}{eta}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressReporter:
    """Reports ``measure() -> (done, total)`` on *stream* until :meth:`stop`."""

    def __init__(self, measure: Callable[[], tuple[int, int | None]], label: str, mode: str, stream: TextIO = sys.stderr) -> None:
        self.measure, self.label, self.mode, self.stream = measure, label, mode, stream
        self._stopped = threading.Event()
        self._drawn = False
        self._thread = threading.Thread(target=self._run, name="pydra-progress", daemon=True)

    def start(self) -> "ProgressReporter":
        if self.mode != "off":
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reporting; a bar is erased, so the job's own last line follows cleanly."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _run(self) -> None:
        started = time.monotonic()
        if self._stopped.wait(QUIET_SECONDS):
            return
        interval = BAR_SECONDS if self.mode == "bar" else LINE_SECONDS
        while True:
            done, total = self.measure()
            rate = done / max(time.monotonic() - started, 1e-9)
            text = f"{self.label} {progress_text(done, total, rate)}"
            if self.mode == "bar":
                self.stream.write(f"\r\x1b[K{text}")
                self._drawn = True
            else:
                self.stream.write(f"pydra: {text}\n")
            self.stream.flush()
            if self._stopped.wait(interval):
                return
