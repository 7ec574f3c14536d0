"""Tab completion for the admin shell: command names, then job ids, ranks, task files or settings.

The grammar is a prompt-toolkit ``NestedCompleter`` built from
:data:`~pydra.shell.commands.COMMANDS`; the values it offers after a command
(job ids, ranks) come from the cluster, cached by :class:`ClusterFacts` so
that completing never waits on the network.
"""

from __future__ import annotations

import argparse
import ast
import os
from typing import Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, NestedCompleter
from prompt_toolkit.document import Document

from pydra.control import CONFIG
from pydra.shell.commands import COMMANDS, LOCAL_COMMANDS


class ClusterFacts:
    """What completion knows of the cluster: job ids and worker ranks, refreshed by the toolbar."""

    def __init__(self) -> None:
        self.job_ids: list[int] = []
        self.ranks: list[int] = []


class TaskFileCompleter(Completer):
    """``submit``'s TARGET, as a path at any depth: directories, ``file.py:``, then the names the file defines.

    The whole word before the cursor is the path (prompt-toolkit's own word
    stops at ``/``). Names come from the file's syntax tree, never from
    importing it: completing must not run the admin's code. *valued* are the
    command's options that take a value (``--priority N``): neither is TARGET.
    """

    def __init__(self, valued: frozenset[str]) -> None:
        self.valued = valued

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        word = "" if not text or text[-1].isspace() else words.pop()
        if self._positionals(words):
            return  # past TARGET: the INPUTs are the user's own
        where, colon, name = word.rpartition(":")
        if colon and where.endswith(".py"):
            for defined in _defined_names(os.path.expanduser(where)):
                if defined.startswith(name):
                    yield Completion(defined, start_position=-len(name))
            return
        yield from self._paths(word)

    def _paths(self, word: str) -> Iterator[Completion]:
        folder, start = os.path.split(word)
        try:
            entries = sorted(os.scandir(os.path.expanduser(folder) or "."), key=lambda entry: entry.name)
        except OSError:
            return
        offered = 0
        for entry in entries:
            if not entry.name.startswith(start) or (entry.name.startswith(".") and not start.startswith(".")):
                continue
            try:
                suffix = "/" if entry.is_dir() else ":" if entry.name.endswith(".py") else None
            except OSError:
                continue
            if suffix is not None and offered < _MOST_OFFERED:
                offered += 1
                yield Completion(os.path.join(folder, entry.name) + suffix, start_position=-len(word),
                                 display=entry.name + suffix)


    def _positionals(self, words: list[str]) -> list[str]:
        """The words that are neither options nor an option's value."""
        kept, skip = [], False
        for word in words:
            if skip:
                skip = False
            elif word.startswith("-"):
                skip = word in self.valued
            else:
                kept.append(word)
        return kept


#: most paths offered at once (a directory of thousands is no list to read)
_MOST_OFFERED = 200


def _valued_options(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The option strings of *parser* that take a value (argparse lists its actions only privately)."""
    return frozenset(option for action in parser._actions for option in action.option_strings if action.nargs != 0)


def _defined_names(path: str) -> list[str]:
    """The public names a Python file defines at its top level: classes, functions, assignments."""
    try:
        with open(path, "rb") as source:
            tree = ast.parse(source.read(), path)
    except (OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [target.id for target in targets if isinstance(target, ast.Name)]
    return [name for name in dict.fromkeys(names) if not name.startswith("_")]


class ShellCompleter(Completer):
    """Completes the command grammar with the cluster's current job ids and ranks."""

    def __init__(self, facts: ClusterFacts) -> None:
        self.facts = facts

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        nested = NestedCompleter.from_nested_dict(self._grammar())
        yield from nested.get_completions(document, complete_event)

    def _grammar(self) -> dict:
        values = {
            "jobs": {str(job): None for job in self.facts.job_ids},
            "ranks": {str(rank): None for rank in self.facts.ranks},
            "settings": {key: None for key in CONFIG},
            "targets": TaskFileCompleter(_valued_options(COMMANDS["submit"].parser)),
            None: None,
        }
        grammar: dict = {name: values[command.completes] for name, command in COMMANDS.items()}
        grammar["jobs"] = {"--all": None}
        grammar["shutdown"] = {"--now": None}
        grammar["help"] = {name: None for name in [*COMMANDS, *LOCAL_COMMANDS]}
        grammar["progress"] = values["jobs"]
        grammar["exit"] = None
        return grammar
