"""``pydra shell``: connect to a service cluster, then run one command (``-c``) or a prompt loop.

The loop never crashes on bad input: an unknown command or wrong arguments
print one line and the prompt comes back. Events (a job finishing) print
above the prompt through ``patch_stdout``; history persists in
``~/.pydra/shell_history``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from pydra.control import ControlClient, ControlError, newest_connection_file
from pydra.errors import PydraError
from pydra.launcher import keys, sshagent
from pydra.launcher.identity import add_identity_arguments, load_identity, missing_file
from pydra.progress import LINE_SECONDS, progress_text
from pydra.shell.commands import ShellUsageError, help_text, log_line, parse, run_line
from pydra.shell.completer import ClusterFacts, ShellCompleter
from pydra.shell.toolbar import Toolbar
from pydra.strictmodes import StrictModeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROMPT = "pydra> "


def shell_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pydra shell``."""
    parser = argparse.ArgumentParser(
        prog="pydra shell",
        description="The admin shell of a service cluster (pydra serve): watch health, manage the job queue.",
        epilog="Type help at the prompt for the commands. Exit status with -c: 0 done, 1 the cluster refused "
               "or failed the command, 2 bad usage or no cluster to attach to.",
    )
    parser.add_argument("--connect", type=Path, metavar="FILE", help="a cluster's connection file (default: the newest local cluster)")
    add_identity_arguments(parser, "your private key, authorized for the admin role")
    parser.add_argument("-c", dest="command", metavar="COMMAND", help="run COMMAND and exit with its status")
    parser.add_argument("--json", action="store_true", help="print replies as JSON (for scripts)")
    args = parser.parse_args(argv)
    try:
        # Strict modes (pydra.strictmodes): a key, or a connection file, that others could write is refused.
        connection = args.connect or newest_connection_file()  # no cluster: say so before asking for a passphrase
        identity = load_identity(args.identity, args.passphrase_file)
        client = ControlClient(connection, identity)
    except StrictModeError as exc:
        print(f"pydra shell: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        where = 'with pydra-role="admin", to the authorized_keys of the host running rank 0'
        print(f"pydra shell: error: {missing_file(exc, args.identity, where)}", file=sys.stderr)
        return EXIT_USAGE
    except (ControlError, keys.KeyFileError, sshagent.AgentError, OSError) as exc:
        print(f"pydra shell: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command is not None:
            return run_once(client, args.command, args.json)
        return interact(client, args.json)
    finally:
        client.close()


def run_once(client: Any, line: str, as_json: bool) -> int:
    """``-c``: one command; its output on stdout, a refusal on stderr; the exit status."""
    if line.strip() in ("exit", "quit"):  # (help lists them: nothing to do here)
        return EXIT_OK
    try:
        output = answer(client, line, as_json)
    except ShellUsageError as exc:
        print(f"pydra shell: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PydraError as exc:
        print(f"pydra shell: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C while waiting for the cluster: what it does with the request is its own
        print("pydra shell: interrupted (the cluster may still carry the command out)", file=sys.stderr)
        return 130
    if output:
        print(output)
    return EXIT_OK


def answer(client: Any, line: str, as_json: bool = False) -> str:
    """The text for one command line, shell-side commands included."""
    words = line.split()
    if words and words[0] == "help":
        return help_text(words[1] if len(words) > 1 else None)
    if words and words[0] == "progress":
        return follow_progress(client, words[1:])
    if words and words[0] == "logs" and "--follow" in words:
        return follow_logs(client, line)
    return run_line(client, line, as_json)


def follow_logs(client: Any, line: str, interval: float = 0.5) -> str:
    """``logs ... --follow``: print records as they come, until Ctrl-C."""
    command, args = parse(line)
    _, request = command.request(args)
    after = 0
    try:
        while True:
            for record in client.call("logs", after=after, **request):
                print(log_line(record), flush=True)
                after = record["number"]
            time.sleep(interval)
    except KeyboardInterrupt:
        return ""


def follow_progress(client: Any, words: list[str], interval: float = 0.5, stream: TextIO | None = None) -> str:
    """``progress [ID]``: a bar per running job (or for job ID) until they end or Ctrl-C.

    On a terminal the bars are redrawn in place; elsewhere (a pipe, a log)
    the lines are printed when first seen, every ``LINE_SECONDS`` and at the end.
    """
    if len(words) > 1 or (words and not (words[0].isascii() and words[0].isdigit())):  # (int() refuses '²')
        raise ShellUsageError("progress: usage: progress [ID]")
    if stream is None:
        # The real terminal: the interactive loop's patched stdout would escape the redrawing codes.
        sys.stdout.flush()
        stream = sys.__stdout__ if sys.__stdout__ is not None and sys.__stdout__.isatty() else sys.stdout
    board = _ProgressBoard(stream)
    first: dict[int, tuple[float, int]] = {}
    ended: dict[int, dict] = {}  # jobs seen running that have ended since: `jobs` no longer lists them
    try:
        while True:
            just_ended: list[int] = []
            if words:
                jobs = [client.call("job", job_id=int(words[0]))]
            else:
                jobs = client.call("jobs")
                listed = {job["id"] for job in jobs}
                just_ended = sorted(set(first) - listed - set(ended))
                ended.update((job_id, client.call("job", job_id=job_id)) for job_id in just_ended)
                jobs = sorted([*ended.values(), *jobs], key=lambda job: job["id"])
            running = [job for job in jobs if job["state"] in ("queued", "running")]
            if not jobs:
                return "no job is queued or running"
            board.show([progress_line(job, first) for job in jobs], news=not running or bool(just_ended))
            if not running:
                return ""
            time.sleep(interval)
    except KeyboardInterrupt:
        return ""


class _ProgressBoard:
    """The lines of ``progress``: redrawn in place on a terminal, printed now and then elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.redraw = stream.isatty()
        self.drawn = 0  # lines drawn last time (terminal)
        self.printed_at: float | None = None  # when lines were last printed (not a terminal)

    def show(self, lines: list[str], news: bool) -> None:
        """Draw *lines*; off a terminal, print them if *news* (a job ended) or the last print is old enough."""
        if self.redraw:
            up = f"\x1b[{self.drawn}A\r" if self.drawn else ""
            # Each line cleared before it is written, and whatever was below the last one after.
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines) + "\x1b[J")
            self.drawn = len(lines)
        else:
            now = time.monotonic()
            if not news and self.printed_at is not None and now - self.printed_at < LINE_SECONDS:
                return
            self.printed_at = now
            self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()


def progress_line(job: dict, first: dict[int, tuple[float, int]]) -> str:
    """``job 3 running [#####.....] 300/1000 30%  120/s  ETA 6s`` (rate since the shell first saw it)."""
    done, total = job.get("items_done") or 0, job.get("items_total")
    now = time.monotonic()
    seen_at, seen_done = first.setdefault(job["id"], (now, done))
    rate = (done - seen_done) / (now - seen_at) if now > seen_at else None  # None: first seen just now
    return f"job {job['id']} {job['state']} {progress_text(done, total, rate)}"


def interact(client: Any, as_json: bool, session: Any = None, echo: Callable[[str], None] = print) -> int:
    """The prompt loop, until ``exit`` or Ctrl-D; everything it shows goes through *echo*."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.patch_stdout import patch_stdout

    facts = ClusterFacts()
    toolbar = Toolbar(client, facts, echo)
    toolbar.refresh()
    if session is None:
        history = keys.pydra_home() / "shell_history"
        history.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        session = PromptSession(history=FileHistory(str(history)))
    toolbar.start()
    try:
        with patch_stdout():
            while True:
                try:
                    line = session.prompt(
                        PROMPT, completer=ShellCompleter(facts), bottom_toolbar=toolbar, refresh_interval=1.0,
                        complete_while_typing=False,
                    )
                except KeyboardInterrupt:
                    continue  # Ctrl-C clears the line, as in a terminal shell
                except EOFError:
                    return EXIT_OK
                line = line.strip()
                if not line:
                    continue
                if line in ("exit", "quit"):
                    return EXIT_OK
                # A line announced while progress redraws its bars would throw its count of lines out.
                quiet = toolbar.held() if line.split()[0] == "progress" else contextlib.nullcontext()
                try:
                    with quiet:
                        output = answer(client, line, as_json)
                except PydraError as exc:  # usage errors and the cluster's refusals: one line, then the prompt
                    echo(f"error: {exc}")
                    continue
                except KeyboardInterrupt:  # while waiting for the cluster: the prompt comes back
                    echo("interrupted (the cluster may still carry the command out)")
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug in the shell must not end the session
                    echo(f"error: {type(exc).__name__}: {exc} (a bug in pydra shell)")
                    continue
                if output:
                    echo(output)
    finally:
        toolbar.stop()
