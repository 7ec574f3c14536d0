"""The admin shell's commands: how each parses its words, asks the cluster, and shows the answer.

Every command is a :class:`Command` in :data:`COMMANDS`. Parsing and showing
are separate from the connection, so ``pydra shell -c``, the interactive
shell and the tests all go through :func:`run_line`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pydra.control import ControlError
from pydra.errors import PydraError


class ShellUsageError(PydraError):
    """The admin typed something the shell cannot parse; the message is the one line to show."""


class Client(Protocol):
    def call(self, command: str, **args: Any) -> Any: ...


@dataclass(frozen=True)
class Command:
    """One shell command: its grammar (an argparse parser), the request it makes, how it shows the reply."""

    name: str
    help: str
    parser: argparse.ArgumentParser
    request: Callable[[argparse.Namespace], tuple[str, dict]]
    show: Callable[[Any], str]
    #: what completes after the name: "jobs", "ranks", "targets", "settings" or None
    completes: str | None = None


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ShellUsageError(f"{self.prog}: {message} (usage: {self.format_usage().strip()[7:]})")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise ShellUsageError(message or self.format_help())


def _parser(name: str, help_text: str) -> _Parser:
    return _Parser(prog=name, description=help_text, add_help=False, allow_abbrev=False)


# -- showing replies ------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _progress(job: dict) -> str:
    done, total = job.get("items_done") or 0, job.get("items_total")
    return f"{done}/{total}" if total else (str(done) if done else "-")


def show_status(status: dict) -> str:
    workers = status["workers"]
    worker_text = ", ".join(f"{count} {state}" for state, count in workers.items() if count) or "none"
    flags = " (queue paused)" if status["paused"] else ""
    flags += " (shutting down)" if status["shutting_down"] else ""
    return "\n".join([
        f"cluster   {status['cluster']}{flags}",
        f"uptime    {_duration(status['uptime'])}",
        f"ranks     {status['ranks']} on {', '.join(status['hosts'])}",
        f"workers   {worker_text}",
        f"queue     {status['queued']} queued, {status['running']} running",
        f"jobs      {status['done']} done, {status['failed']} failed, {status['cancelled']} cancelled",
        f"run dir   {status['run_dir']}",
    ])


def show_workers(rows: list[dict]) -> str:
    def memory(value: int | None) -> str:
        return "-" if not value else f"{value / 2**20:.0f} MiB"

    table = [
        [
            str(w["rank"]), w["host"], w["state"], ",".join(map(str, w["jobs"])) or "-", str(w["units_inflight"]),
            str(w["units_done"]), str(w["failures"]), f"{w['heartbeat_age']:.1f}s",
            "-" if w["cpu_percent"] is None else f"{w['cpu_percent']:.0f}%", memory(w["memory_bytes"]),
            str(w["threads"] or "-"),
        ]
        for w in rows
    ]
    header = ["RANK", "HOST", "STATE", "JOBS", "UNITS", "DONE", "FAILED", "HEARTBEAT", "CPU", "MEMORY",
              "THREADS"]
    return _table(table, header)


def show_jobs(jobs: list[dict]) -> str:
    rows = [
        [str(j["id"]), j["state"], str(j["priority"]), j["target"], _progress(j), _duration(j["seconds"]), (j["error"] or "")[:60]]
        for j in jobs
    ]
    return _table(rows, ["ID", "STATE", "PRIORITY", "TARGET", "ITEMS", "TIME", "ERROR"])


def show_job(job: dict) -> str:
    lines = [
        f"job {job['id']}: {job['state']}",
        f"target    {job['target']} {' '.join(job['inputs'])}".rstrip(),
        f"priority  {job['priority']}",
        f"items     {_progress(job)}",
        f"time      {_duration(job['seconds'])}",
    ]
    for state, at in job.get("transitions", []):
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(at))}  {state}")
    if job["result_path"]:
        lines.append(f"result    {job['result_path']}")
    if job["error"]:
        lines.append(f"error     {job['error']}")
    if job["traceback"]:
        lines.append(job["traceback"].rstrip())
    return "\n".join(lines)


def show_logs(records: list[dict]) -> str:
    return "\n".join(log_line(record) for record in records) or "(no log records)"


def log_line(record: dict) -> str:
    """``14:02:11 rank 2 job 7 WARNING mytask: the message``."""
    when = time.strftime("%H:%M:%S", time.localtime(record["time"]))
    job = f" job {record['job']}" if record["job"] is not None else ""
    return f"{when} rank {record['rank']}{job} {record['level']} {record['logger']}: {record['message']}"


def show_config(settings: dict) -> str:
    return "\n".join(f"{key:<18} {value}" for key, value in settings.items())


def absolute_target(target: str) -> str:
    """*target* with its task file's path made absolute, if the file is here: rank 0 has another cwd."""
    where, sep, name = target.rpartition(":")
    if sep and where.endswith(".py") and os.path.isfile(where):
        return f"{os.path.abspath(where)}:{name}"
    return target


def _said(template: str) -> Callable[[Any], str]:
    return lambda result: template.format(**result) if isinstance(result, dict) else template


# -- the commands ---------------------------------------------------------------------------------


def _submitted(job: dict) -> str:
    """What ``submit`` answered; a job that failed at once (its TARGET does not load) is the command failing."""
    if job.get("state") == "failed":
        raise ControlError(f"submitted job {job['id']}, which failed at once: {job.get('error') or 'see job ' + str(job['id'])}")
    return f"submitted job {job['id']} ({job['state']})"


def _build() -> dict[str, Command]:
    commands: list[Command] = []

    def add(name: str, help_text: str, request: Callable, show: Callable, completes: str | None = None,
            arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
        parser = _parser(name, help_text)
        if arguments is not None:
            arguments(parser)
        commands.append(Command(name, help_text, parser, request, show, completes))

    def job_id(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job_id", type=int, metavar="ID")

    def rank(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rank", type=int, metavar="RANK")

    add("status", "cluster id, uptime, ranks, hosts, workers by state, queue, jobs done/failed",
        lambda a: ("status", {}), show_status)
    add("workers", "per worker rank: host, state, jobs, units, failures, heartbeat age, CPU, memory",
        lambda a: ("workers", {}), show_workers)
    add("queue", "the queued jobs, in the order they will start", lambda a: ("queue", {}), show_jobs)
    add("jobs", "queued and running jobs (--all: finished ones too)",
        lambda a: ("jobs", {"everything": a.all}), show_jobs,
        arguments=lambda p: p.add_argument("--all", action="store_true", help="finished jobs too"))
    add("job", "one job: state, timings, result, error and traceback", lambda a: ("job", {"job_id": a.job_id}),
        show_job, "jobs", job_id)

    def submit_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("target", metavar="TARGET")
        parser.add_argument("inputs", metavar="INPUT", nargs="*", default=[])  # a default: argparse calls it required otherwise
        parser.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs first (default 0)")

    add("submit", "queue TARGET on INPUTs (--priority N: higher runs first)",
        lambda a: ("submit", {"target": absolute_target(a.target), "inputs": a.inputs, "priority": a.priority}),
        _submitted, "targets", submit_arguments)
    add("cancel", "cancel a queued or running job", lambda a: ("cancel", {"job_id": a.job_id}),
        _said("job {id} cancelled"), "jobs", job_id)

    def priority_arguments(parser: argparse.ArgumentParser) -> None:
        job_id(parser)
        parser.add_argument("priority", type=int, metavar="N")

    add("priority", "change a queued job's priority", lambda a: ("priority", {"job_id": a.job_id, "priority": a.priority}),
        _said("job {id} now has priority {priority}"), "jobs", priority_arguments)
    add("retry", "queue a failed or cancelled job again", lambda a: ("retry", {"job_id": a.job_id}),
        _said("job {id} queued again"), "jobs", job_id)
    add("pause", "start no more jobs (running ones go on)", lambda a: ("pause", {}), _said("queue paused"))
    add("resume", "start queued jobs again", lambda a: ("resume", {}), _said("queue resumed"))
    add("drain", "let a worker finish its units and take no more", lambda a: ("drain", {"rank": a.rank}),
        _said("rank {rank} draining"), "ranks", rank)
    add("undrain", "let a drained (or draining) worker take work again", lambda a: ("undrain", {"rank": a.rank}),
        _said("rank {rank} takes work again"), "ranks", rank)
    add("restart", "restart a worker's executor (its isolated child process)", lambda a: ("restart", {"rank": a.rank}),
        _said("rank {rank} will start a new executor process"), "ranks", rank)

    def config_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("key", nargs="?", metavar="KEY")
        parser.add_argument("value", nargs="?", metavar="VALUE")

    add("config", "show the runtime settings, or set KEY to VALUE",
        lambda a: ("config", {"key": a.key, "value": a.value}), show_config, "settings", config_arguments)
    def logs_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job_id", type=int, nargs="?", metavar="ID")
        parser.add_argument("--rank", type=int, metavar="R", help="only what rank R logged")
        parser.add_argument("--follow", action="store_true", help="keep printing new records until Ctrl-C")

    add("logs", "log records of tasks (WARNING and up, or the task's level) and the cluster, by job or rank",
        lambda a: ("logs", {"job_id": a.job_id, "rank": a.rank}), show_logs, "jobs", logs_arguments)
    add("shutdown", "stop the cluster once running jobs end (--now: cancel them)",
        lambda a: ("shutdown", {"now": a.now}), _said("shutting down"),
        arguments=lambda p: p.add_argument("--now", action="store_true", help="cancel running and queued jobs"))
    return {command.name: command for command in commands}


COMMANDS = _build()

#: commands the shell itself answers, without the cluster
LOCAL_COMMANDS = {
    "progress": "live progress bars of running jobs, or of job ID, until they end or Ctrl-C",
    "help": "list the commands, or explain one: help COMMAND",
    "exit": "leave the shell (also Ctrl-D)",
}
#: their usage lines, for ``help NAME``
LOCAL_USAGE = {"progress": "usage: progress [ID]", "help": "usage: help [COMMAND]", "exit": "usage: exit"}


def help_text(name: str | None = None) -> str:
    """``help``: every command with its one-line description, or one command's usage."""
    if name:
        if name in LOCAL_COMMANDS:
            return f"{LOCAL_USAGE.get(name, name)}\n\n{LOCAL_COMMANDS[name]}"
        command = COMMANDS.get(name)
        if command is None:
            raise ShellUsageError(f"no command {name!r}: type help for the list")
        return command.parser.format_help().strip()
    width = max(map(len, [*COMMANDS, *LOCAL_COMMANDS]))
    lines = [f"{name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    lines += [f"{name:<{width}}  {text}" for name, text in LOCAL_COMMANDS.items()]
    return "\n".join(lines)


def parse(line: str) -> tuple[Command, argparse.Namespace]:
    """The command and arguments of *line*; :class:`ShellUsageError` if it makes no sense."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ShellUsageError(f"cannot split the line: {exc}") from None
    if not words:
        raise ShellUsageError("no command: type help for the list")
    command = COMMANDS.get(words[0])
    if command is None:
        raise ShellUsageError(f"unknown command {words[0]!r}: type help for the list")
    return command, command.parser.parse_args(words[1:])


def run_line(client: Client, line: str, as_json: bool = False) -> str:
    """Carry out one command line; the text to print. Raises ShellUsageError or ControlError."""
    command, args = parse(line)
    name, request = command.request(args)
    result = client.call(name, **request)
    if as_json:
        return json.dumps(result, indent=1, sort_keys=True)
    return command.show(result)
