"""The admin shell's own behaviour, without a cluster: a real PromptSession fed through a pipe.

The client here is a stand-in that answers like a cluster (recorded replies);
what is tested is the shell: the loop survives bad input with one line each,
completion offers commands, job ids, ranks and settings, the toolbar shows
health, ``-c`` exits 0/1/2, and ``--json`` prints what the cluster said.
The shell against real clusters is in test_cluster.py and test_terminal.py.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.shortcuts import PromptSession

from pydra.control import ControlError
from pydra.shell import app
from pydra.shell.completer import ClusterFacts, ShellCompleter
from pydra.shell.toolbar import Toolbar

STATUS = {
    "cluster": "c1", "uptime": 75.0, "ranks": 4, "hosts": ["a", "b"],
    "workers": {"idle": 2, "busy": 1, "lost": 0, "draining": 0},
    "queued": 1, "running": 1, "done": 5, "failed": 1, "cancelled": 0,
    "paused": False, "shutting_down": False, "run_dir": "/runs/c1",
}
JOB = {
    "id": 7, "target": "t.py:T", "inputs": ["1"], "priority": 2, "state": "failed", "submitted": 1.0,
    "started": 2.0, "finished": 5.0, "seconds": 3.0, "items_done": 3, "items_total": 4,
    "error": "ValueError: bad", "traceback": "Worker 1 of 4 on a\nTraceback...", "result_path": None,
    "transitions": [["queued", 1.0], ["running", 2.0], ["failed", 5.0]],
}
WORKER = {
    "rank": 1, "host": "a", "state": "busy", "jobs": [7], "units_inflight": 2, "units_done": 10, "failures": 1,
    "busy_seconds": 1.0, "heartbeat_age": 0.2, "cpu_percent": 95.0, "memory_bytes": 64 << 20, "threads": 3,
}


class RecordedCluster:
    """Answers control requests with recorded replies, and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict]] = []

    def call(self, command: str, **args):
        self.asked.append((command, args))
        if command == "cancel" and args["job_id"] == 99:
            raise ControlError("no job 99")
        return {
            "status": STATUS,
            "jobs": [JOB],
            "queue": [],
            "job": JOB,
            "workers": [WORKER],
            "cancel": {**JOB, "state": "cancelled"},
            "submit": {**JOB, "id": 8, "state": "queued"},
            "undrain": {"rank": args.get("rank"), "draining": False},
        }.get(command)


def drive(lines: str) -> tuple[int, RecordedCluster, str]:
    """Run the interactive loop on *lines* typed into a real PromptSession; (status, cluster, what it showed)."""
    cluster = RecordedCluster()
    shown: list[str] = []
    with create_pipe_input() as pipe:
        pipe.send_text(lines)
        pipe.close()  # the end of the input: Ctrl-D, if no "exit" came first
        session = PromptSession(input=pipe, output=DummyOutput())
        status = app.interact(cluster, as_json=False, session=session, echo=shown.append)
    return status, cluster, "\n".join(shown)


def test_the_loop_survives_bad_input_with_one_line_each():
    status, cluster, out = drive("bogus\njob x\ncancel 99\n'unclosed\nstatus\nexit\n")
    assert status == 0
    assert "error: unknown command 'bogus': type help for the list" in out
    assert "error: job: argument ID: invalid int value: 'x'" in out
    assert "error: no job 99" in out
    assert "error: cannot split the line" in out
    assert "cluster   c1" in out and "workers   2 idle, 1 busy" in out  # the loop went on after all that
    assert ("cancel", {"job_id": 99}) in cluster.asked


def test_commands_send_their_arguments():
    status, cluster, out = drive("submit t.py:T 1 2 --priority 3\ncancel 7\njob 7\nworkers\n")  # then Ctrl-D
    assert status == 0
    assert ("submit", {"target": "t.py:T", "inputs": ["1", "2"], "priority": 3}) in cluster.asked
    assert "submitted job 8 (queued)" in out and "job 7 cancelled" in out
    assert "Worker 1 of 4 on a" in out  # the traceback of a failed job
    assert "RANK" in out and "95%" in out and "64 MiB" in out
    header, row = next((line, next_line) for line, next_line in zip(out.splitlines(), out.splitlines()[1:])
                       if line.startswith("RANK"))
    assert header.split()[-1] == "THREADS" and row.split()[-1] == "3"


def test_help_lists_every_command_and_explains_one():
    _, _, out = drive("help\nhelp submit\nhelp nosuch\n")
    for name in ("status", "workers", "queue", "jobs", "submit", "cancel", "priority", "pause", "resume",
                 "retry", "progress", "drain", "restart", "config", "shutdown"):
        assert f"\n{name}" in out or out.startswith(name)
    assert "--priority N" in out
    assert "error: no command 'nosuch'" in out


def completions(text: str, facts: ClusterFacts) -> list[str]:
    document = Document(text, len(text))
    return [c.text for c in ShellCompleter(facts).get_completions(document, CompleteEvent(completion_requested=True))]


def test_completion_offers_commands_job_ids_ranks_and_settings():
    facts = ClusterFacts()
    facts.job_ids, facts.ranks = [3, 14], [1, 2, 3]
    assert completions("can", facts) == ["cancel"]
    assert set(completions("sh", facts)) == {"shutdown"}
    assert completions("cancel ", facts) == ["3", "14"]
    assert completions("job 1", facts) == ["14"]
    assert completions("drain ", facts) == ["1", "2", "3"]
    assert "max_jobs" in completions("config ", facts)
    assert completions("jobs ", facts) == ["--all"]
    assert "submit" in completions("help s", facts)


def test_the_toolbar_shows_health_and_announces_finished_jobs():
    cluster = RecordedCluster()
    said: list[str] = []
    facts = ClusterFacts()
    toolbar = Toolbar(cluster, facts, said.append)
    assert toolbar() == " connecting..."
    toolbar.refresh()
    assert "c1  ranks 4  workers: 2 idle, 1 busy, 0 lost  jobs: 1 queued, 1 running, 5 done, 1 failed" in toolbar()
    assert facts.job_ids == [7] and facts.ranks == [1]
    toolbar._states[7] = "running"  # seen running before this poll
    toolbar.refresh()
    assert said == ["job 7 (t.py:T) failed"]


class ChangingCluster(RecordedCluster):
    """A cluster whose job list is whatever the test last set."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[dict] = []

    def call(self, command: str, **args):
        return self.jobs if command == "jobs" else super().call(command, **args)


def test_the_toolbar_announces_a_job_that_ran_between_two_polls_but_not_what_ended_before_it_looked():
    cluster, said = ChangingCluster(), []
    cluster.jobs = [{**JOB, "id": 3, "state": "done"}]  # ended before the shell started
    toolbar = Toolbar(cluster, ClusterFacts(), said.append)
    toolbar.refresh()
    assert said == []
    cluster.jobs.append({**JOB, "id": 8, "state": "done"})  # submitted, run and done within one poll interval
    toolbar.refresh()
    assert said == ["job 8 (t.py:T) done"]
    toolbar.refresh()
    assert said == ["job 8 (t.py:T) done"]  # once


def test_the_toolbar_holds_announcements_back_while_progress_draws():
    said: list[str] = []
    toolbar = Toolbar(RecordedCluster(), ClusterFacts(), said.append)
    toolbar.refresh()  # the first look: job 7 had failed before it
    toolbar._states[7] = "running"
    with toolbar.held():
        toolbar.refresh()
        assert said == []  # not between the bars
    assert said == ["job 7 (t.py:T) failed"]  # said once they are drawn


@pytest.mark.parametrize(
    "line, status",
    [("status", 0), ("cancel 99", 1), ("bogus", 2), ("job", 2), ("", 2), ("   ", 2), ("progress \u00b2", 2)],
)
def test_one_command_exits_with_its_status(line, status, capsys):
    assert app.run_once(RecordedCluster(), line, as_json=False) == status
    captured = capsys.readouterr()
    if status:
        assert captured.err.startswith("pydra shell: ") and captured.err.count("\n") == 1
    else:
        assert "cluster   c1" in captured.out


def test_exit_in_one_command_does_nothing_and_succeeds(capsys):
    """help lists exit and quit; as -c they said "unknown command"."""
    cluster = RecordedCluster()
    assert app.run_once(cluster, "exit", as_json=False) == app.run_once(cluster, "quit", as_json=False) == 0
    assert cluster.asked == [] and capsys.readouterr() == ("", "")


class InterruptedCluster(RecordedCluster):
    """Ctrl-C while waiting for the cluster's reply to a submit."""

    def call(self, command: str, **args):
        if command == "submit":
            raise KeyboardInterrupt
        return super().call(command, **args)


def test_ctrl_c_while_waiting_for_the_cluster_is_one_line(capsys):
    """It ended the shell with a KeyboardInterrupt traceback (the REPL too)."""
    assert app.run_once(InterruptedCluster(), "submit t.py:T", as_json=False) == 130
    assert capsys.readouterr().err == "pydra shell: interrupted (the cluster may still carry the command out)\n"
    shown: list[str] = []
    with create_pipe_input() as pipe:
        pipe.send_text("submit t.py:T\nstatus\n")
        pipe.close()
        status = app.interact(InterruptedCluster(), as_json=False, session=PromptSession(input=pipe, output=DummyOutput()),
                              echo=shown.append)
    assert status == 0
    assert "interrupted (the cluster may still carry the command out)" in shown and "cluster   c1" in "\n".join(shown)


def test_json_prints_the_cluster_reply(capsys):
    assert app.run_once(RecordedCluster(), "jobs --all", as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == [JOB]


def test_progress_lines_show_rate_and_eta_once_measured():
    """The first line of a job said "0/s": no rate was measured yet."""
    first: dict = {}
    line = app.progress_line({**JOB, "state": "running", "items_done": 50, "items_total": 100}, first)
    assert line == "job 7 running [###############...............] 50/100 50%"
    first[7] = (first[7][0] - 10.0, 0)  # as if first seen 10 s ago, at 0 items
    line = app.progress_line({**JOB, "state": "running", "items_done": 50, "items_total": 100}, first)
    assert re.fullmatch(r"job 7 running \[#{15}\.{15}\] 50/100 50%  5/s  ETA (9|10)s", line), line


# -- the shell's own commands, a submit that fails at once, a missing key -------------------------------


@pytest.mark.parametrize("name, usage", [("progress", "usage: progress [ID]"), ("help", "usage: help [COMMAND]"),
                                         ("exit", "usage: exit")])
def test_help_explains_the_shells_own_commands_too(name: str, usage: str) -> None:
    status, _, shown = drive(f"help {name}\nexit\n")
    assert status == 0 and usage in shown and "no command" not in shown


def test_a_submit_whose_job_fails_at_once_is_a_failed_command(capsys) -> None:
    class Failing(RecordedCluster):
        def call(self, command: str, **args):
            return {**JOB, "id": 9, "state": "failed", "error": "cannot load nosuch.py"}

    assert app.run_once(Failing(), "submit nosuch.py:X", as_json=False) == 1
    assert "submitted job 9, which failed at once: cannot load nosuch.py" in capsys.readouterr().err
    assert app.run_once(RecordedCluster(), "submit good.py:Y", as_json=False) == 0


def test_no_key_says_how_to_make_one(tmp_path, capsys) -> None:
    status = app.shell_main(["-i", str(tmp_path / "id_ed25519"), "--connect", str(tmp_path / "c.json"), "-c", "status"])
    error = capsys.readouterr().err
    assert status == 2
    assert f"no key at {tmp_path / 'id_ed25519'}: make one with `pydra keygen`" in error and "Errno" not in error


def test_no_cluster_is_said_before_the_key_is_read(tmp_path, monkeypatch, capsys) -> None:
    """Without a running cluster the shell says so at once: no passphrase asked for a connection never made."""
    monkeypatch.setenv("PYDRA_HOME", str(tmp_path))
    status = app.shell_main(["-i", str(tmp_path / "id_ed25519"), "-c", "status"])
    error = capsys.readouterr().err
    assert status == 2
    assert f"no running cluster has a connection file in {tmp_path / 'run'}" in error and "key" not in error


# -- completing task files, at any depth -------------------------------------------------------------


@pytest.fixture
def task_tree(tmp_path, monkeypatch):
    """A directory with task files two levels down (and a hidden one), as the current directory."""
    (tmp_path / "examples" / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / "examples" / "wordcount.py").write_text("class WordCount:\n    pass\n\ndef words():\n    pass\n_hidden = 1\n")
    (tmp_path / "examples" / "words.txt").write_text("not a task file\n")
    (tmp_path / "examples" / "deep" / "deeper" / "gang.py").write_text("Norm = None\nasync def norms():\n    pass\n")
    (tmp_path / ".secret").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_completion_of_task_files_goes_past_the_first_path_segment(task_tree):
    facts = ClusterFacts()
    assert completions("submit ex", facts) == ["examples/"]
    assert completions("submit examples/", facts) == ["examples/deep/", "examples/wordcount.py:"]
    assert completions("submit examples/wo", facts) == ["examples/wordcount.py:"]
    assert completions("submit examples/deep/deeper/g", facts) == ["examples/deep/deeper/gang.py:"]
    assert completions("submit --priority 3 examples/wo", facts) == ["examples/wordcount.py:"]
    assert completions("submit ./examples/wo", facts) == ["./examples/wordcount.py:"]
    assert completions(f"submit {task_tree}/examples/wo", facts) == [f"{task_tree}/examples/wordcount.py:"]
    assert completions("submit .s", facts) == [".secret/"]
    assert completions("submit ", facts) == ["examples/"]  # hidden entries only when asked for
    assert completions("submit nowhere/x", facts) == []


def test_completion_offers_the_names_a_task_file_defines(task_tree):
    facts = ClusterFacts()
    assert completions("submit examples/wordcount.py:", facts) == ["WordCount", "words"]
    assert completions("submit examples/wordcount.py:W", facts) == ["WordCount"]
    assert completions("submit examples/deep/deeper/gang.py:", facts) == ["Norm", "norms"]
    assert completions("submit examples/wordcount.py:WordCount ", facts) == []  # the INPUTs are the user's


def test_tab_completes_a_nested_task_file_at_the_prompt(task_tree):
    """Tab, then (once the completion is in the line: it runs after the key) Enter."""
    cluster = RecordedCluster()
    with create_pipe_input() as pipe:
        session = PromptSession(input=pipe, output=DummyOutput())

        def type_the_rest() -> None:
            deadline = time.monotonic() + 30
            while not session.default_buffer.text.endswith(".py:") and time.monotonic() < deadline:
                time.sleep(0.01)
            pipe.send_text("\nexit\n")

        pipe.send_text("submit examples/deep/deeper/ga\t")
        typist = threading.Thread(target=type_the_rest)
        typist.start()
        status = app.interact(cluster, as_json=False, session=session, echo=lambda text: None)
        typist.join()
    assert status == 0
    submitted = [args for command, args in cluster.asked if command == "submit"]
    assert submitted == [{"target": f"{task_tree}/examples/deep/deeper/gang.py:", "inputs": [], "priority": 0}]


def test_help_completes_the_shells_own_commands_too():
    assert completions("help pro", ClusterFacts()) == ["progress"]
    assert "undrain" in completions("help un", ClusterFacts())


# -- undrain ---------------------------------------------------------------------------------------------


def test_undrain_asks_the_cluster_and_completes_ranks():
    facts = ClusterFacts()
    facts.ranks = [1, 2, 3]
    assert completions("undr", facts) == ["undrain"]
    assert completions("undrain ", facts) == ["1", "2", "3"]
    status, cluster, out = drive("undrain 2\nundrain two\nexit\n")
    assert status == 0
    assert ("undrain", {"rank": 2}) in cluster.asked
    assert "rank 2 takes work again" in out
    assert "error: undrain: argument RANK: invalid int value: 'two'" in out


# -- progress: redrawn in place on a terminal, plain lines elsewhere ---------------------------------------


class ProgressingCluster:
    """Jobs that advance by 25 items at each look of ``jobs``, from 0 to 100, then are done.

    As a service does, ``jobs`` lists only the queued and running ones, and ``job ID`` any.
    """

    def __init__(self, *sizes: int) -> None:
        self.sizes = dict(enumerate(sizes or (100,), start=7))
        self.looks = 0

    def job(self, job_id: int) -> dict:
        total = self.sizes[job_id]
        done = min(25 * self.looks, total)
        return {**JOB, "id": job_id, "state": "done" if done == total else "running", "items_done": done,
                "items_total": total}

    def call(self, command: str, **args):
        if command == "job":
            return self.job(args["job_id"])
        self.looks += 1
        return [job for job in map(self.job, self.sizes) if job["state"] == "running"]


class Screen(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_progress_redraws_its_bars_in_place_on_a_terminal():
    screen = Screen(terminal=True)
    assert app.follow_progress(ProgressingCluster(), [], interval=0, stream=screen) == ""
    drawn = screen.getvalue()
    assert drawn.count("\n") == 4  # four looks at one job, each line drawn over the last
    assert drawn.count("\x1b[1A\r") == 3  # back up one line before each redraw
    last = drawn.split("\x1b[1A\r")[-1]
    assert last.startswith("\x1b[2Kjob 7 done [" + "#" * 30 + "] 100/100 100%") and last.endswith("\n\x1b[J"), last


def test_progress_prints_plain_lines_when_not_on_a_terminal():
    screen = Screen(terminal=False)
    app.follow_progress(ProgressingCluster(), [], interval=0, stream=screen)
    lines = screen.getvalue().splitlines()
    assert "\x1b" not in screen.getvalue()
    assert len(lines) == 2, lines  # when first seen and at the end: the looks between came within LINE_SECONDS
    assert lines[0].startswith("job 7 running [") and lines[1].startswith("job 7 done [")


def test_progress_off_a_terminal_prints_each_jobs_end_when_it_ends():
    """Without an ID, a job that ended left the list (``jobs`` shows the active ones): its end was never printed."""
    screen = Screen(terminal=False)
    app.follow_progress(ProgressingCluster(50, 100), [], interval=0, stream=screen)
    lines = screen.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "job 7 running", "job 8 running",  # when first seen
        "job 7 done", "job 8 running",  # when job 7 ended
        "job 7 done", "job 8 done",  # at the end
    ], lines


def test_progress_with_nothing_running_says_so():
    assert app.follow_progress(ProgressingCluster(0), [], interval=0, stream=Screen(terminal=False)) == (
        "no job is queued or running")


def test_submit_without_a_target_calls_only_the_target_required():
    """argparse listed the optional INPUT as required too: "required: TARGET, INPUT"."""
    from pydra.shell.commands import ShellUsageError, parse

    with pytest.raises(ShellUsageError, match=r"^submit: the following arguments are required: TARGET \(usage: "):
        parse("submit")
