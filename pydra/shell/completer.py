"""Tab completion for the admin shell: command names, then job ids, ranks, targets or settings.

The grammar is a prompt-toolkit ``NestedCompleter`` built from
:data:`~pydra.shell.commands.COMMANDS`; the values it offers after a command
(job ids, ranks) come from the cluster, cached by :class:`ClusterFacts` so
that completing never waits on the network.
"""

from __future__ import annotations

import glob
from typing import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, NestedCompleter
from prompt_toolkit.document import Document

from pydra.control import CONFIG
from pydra.shell.commands import COMMANDS


class ClusterFacts:
    """What completion knows of the cluster: job ids and worker ranks, refreshed by the toolbar."""

    def __init__(self) -> None:
        self.job_ids: list[int] = []
        self.ranks: list[int] = []


def _task_targets(prefix: str) -> list[str]:
    """Task files under the current directory (``file.py:``), for ``submit``."""
    return [f"{path}:" for path in sorted(glob.glob(f"{prefix}*.py") + glob.glob(f"{prefix}*/*.py"))[:50]]


class ShellCompleter(Completer):
    """Completes the command grammar with the cluster's current job ids and ranks."""

    def __init__(self, facts: ClusterFacts) -> None:
        self.facts = facts

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        nested = NestedCompleter.from_nested_dict(self._grammar(document))
        yield from nested.get_completions(document, complete_event)

    def _grammar(self, document: Document) -> dict:
        values = {
            "jobs": {str(job): None for job in self.facts.job_ids},
            "ranks": {str(rank): None for rank in self.facts.ranks},
            "settings": {key: None for key in CONFIG},
            "targets": {target: None for target in _task_targets(document.get_word_before_cursor())},
            None: None,
        }
        grammar: dict = {name: values[command.completes] for name, command in COMMANDS.items()}
        grammar["jobs"] = {"--all": None}
        grammar["shutdown"] = {"--now": None}
        grammar["help"] = {name: None for name in COMMANDS}
        grammar["progress"] = values["jobs"]
        grammar["exit"] = None
        return grammar
