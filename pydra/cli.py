"""The ``pydra`` command line (also ``python -m pydra``): one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from typing import Callable

from pydra import __version__
from pydra.config import check_settings
from pydra import startup
from pydra.errors import SealConfigError

DESCRIPTION = """\
Pydra runs Python task trees over the ranks of an MPI job.

  pydra run -n 4 examples/wordcount.py:WordCount examples/data/*.txt
  mpiexec -n 64 python -m pydra run mypackage.jobs:Nightly --output result.json
"""


#: subcommands that parse their own options: name -> "module:function(argv) -> status"
#: commands that start or join an MPI job: every PYDRA_* setting is checked first, before any MPI
JOB_COMMANDS = ("run", "serve", "launch")

SELF_PARSING = {
    "keygen": "pydra.launcher.keys:keygen_main",
    "node": "pydra.launcher.node:node_main",
    "launch": "pydra.launcher.launch:launch_main",
    "shell": "pydra.shell.app:shell_main",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pydra", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pydra {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a task tree (under mpiexec, or start mpiexec with -n)",
        description=(
            "Run TARGET with INPUTs as its input. Under mpiexec (or a batch system's mpirun) every rank "
            "runs this command and rank 0 schedules the others; with -n N, pydra starts mpiexec itself "
            "on this host; alone, the whole tree runs in this one process."
        ),
        epilog=(
            "TARGET is path/to/file.py:Name or package.module:Name, where Name is a\n"
            "Task subclass (instantiated with no arguments), a Task instance, or a\n"
            "function returning a Task.\n\n"
            "The INPUTs (strings) are the root's input: the arguments of work() for a\n"
            "Task, the items for Parallel and MapReduce, the first child's input for a\n"
            "Sequence.\n\n"
            "Every run keeps a journal in a run directory (printed at start); after a\n"
            "crash, --resume DIR computes only what the journal lacks. Under `pydra launch`\n"
            "the run directory is on the host of rank 0.\n\n"
            "Ctrl-C (SIGINT, SIGTERM) stops every rank; rank 0 prints the command that\n"
            "resumes the job.\n\n"
            "Exit status: 0 success, 1 the job failed, 2 bad usage or TARGET, 130\n"
            "interrupted (143 by SIGTERM)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(run)
    run.add_argument(
        "-n", "--ranks", type=_positive("ranks"), metavar="N",
        help="start mpiexec with N ranks on this host (inside a Slurm or PBS allocation too: `pydra launch` "
             "or your own mpiexec/srun use all of its nodes)",
    )
    run.add_argument("--serve", action="store_true", help="stay up as a service cluster (see pydra serve); TARGET, if any, is its first job")
    add_service_arguments(run)
    run.set_defaults(handler=_run)

    serve = commands.add_parser(
        "serve",
        help="keep a cluster up and run jobs submitted with pydra shell",
        description=(
            "Start a service cluster: every rank stays up, rank 0 runs jobs from a queue (higher "
            "priority first, then oldest) on the shared workers, and serves the admin shell on an "
            "authenticated endpoint. Run it under mpiexec, or with -n N to start mpiexec here."
        ),
        epilog=(
            "Attach with `pydra shell` (the newest local cluster) or `pydra shell --connect FILE`;\n"
            "admins need a key with pydra-role=\"admin\" in ~/.pydra/authorized_keys.\n"
            "Job records stay in the run directory's journal.sqlite after the cluster stops."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("-n", "--ranks", type=_positive("ranks"), metavar="N", help="start mpiexec with N ranks on this host")
    serve.add_argument("--run-dir", metavar="DIR", help="the service's run directory (default: new, under ~/.pydra/runs)")
    serve.add_argument(
        "--no-isolate", action="store_true",
        help="run task code in the worker ranks themselves (by default a service isolates it in child processes)",
    )
    add_service_arguments(serve)
    serve.set_defaults(handler=_serve)

    for name, text in [
        ("keygen", "make or inspect an Ed25519 identity key (like ssh-keygen; see pydra keygen --help)"),
        ("node", "run the agent that starts processes for authorized launchers (see pydra node --help)"),
        ("launch", "authenticate the hosts' agents and run a job through them (see pydra launch --help)"),
        ("shell", "the admin shell of a service cluster (see pydra shell --help)"),
    ]:
        commands.add_parser(name, add_help=False, help=text)  # listed here, parsed by SELF_PARSING
    return parser


def _positive(what: str) -> Callable[[str], int]:
    """An argparse type: a positive number of *what*."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text!r}")
        return value

    return parse


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say which job to run and how: shared by ``pydra run`` and ``pydra launch``."""
    parser.add_argument("target", metavar="TARGET", nargs="?", help="the task to run, file.py:Name or module:Name")
    parser.add_argument("inputs", metavar="INPUT", nargs="*", help="input strings for the root task")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help='write the result as JSON to PATH (strict: NaN and the infinities as the strings "NaN", '
                             '"Infinity", "-Infinity")')
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        help="keep the job's journal in DIR (default: a new directory under ~/.pydra/runs, printed at start); "
             "if DIR already journals this same job (TARGET, INPUTs, source), it is resumed",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="finish the job journaled in run directory DIR, recomputing only what it lacks (no TARGET)",
    )
    parser.add_argument("--no-journal", action="store_true", help="keep no journal (the job cannot be resumed)")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run task code in a child process of each worker, so a crash costs one try (PYDRA_ISOLATE=1)",
    )


def check_job_arguments(args: argparse.Namespace, prog: str) -> bool:
    """Whether the job arguments make sense; if not, say why on stderr. Applies ``--isolate``."""
    if args.resume and (args.target or args.inputs or args.run_dir):
        print(f"{prog}: error: --resume DIR takes no TARGET, INPUT or --run-dir: the journal has them", file=sys.stderr)
        return False
    if not args.resume and not args.target and not getattr(args, "serve", False):
        print(f"{prog}: error: give a TARGET to run, or --resume DIR", file=sys.stderr)
        return False
    for flag in ("output", "run_dir", "resume"):
        if getattr(args, flag, None) == "":  # (taken for no option at all further on)
            print(f"{prog}: error: --{flag.replace('_', '-')}: give a path, not an empty one", file=sys.stderr)
            return False
    if getattr(args, "no_journal", False) and (getattr(args, "run_dir", None) or args.resume):
        print(f"{prog}: error: --no-journal keeps no run directory: give it or --run-dir/--resume, not both",
              file=sys.stderr)
        return False
    output = getattr(args, "output", None)
    if output:
        problem = _unwritable(output)
        if problem:  # said now, not after the job has run
            print(f"{prog}: error: --output {output}: {problem}", file=sys.stderr)
            return False
    if args.isolate:
        os.environ["PYDRA_ISOLATE"] = "1"  # read by the worker ranks (mpiexec passes it on)
    return True


def _unwritable(path: str) -> str | None:
    """Why the job's result could not be written to *path*, or None."""
    if os.path.isdir(path):
        return "is a directory; give a file name"
    real = os.path.realpath(path)  # a symbolic link's file is the one written (pydra.batch.write_json)
    if os.path.exists(real) and not os.path.isfile(real):  # a device or a named pipe: written into
        return None if os.access(real, os.W_OK) else "not writable"
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        return f"no such directory {folder}"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(real) and not os.access(real, os.W_OK)):
        return "not writable"
    return None


def job_arguments(args: argparse.Namespace) -> list[str]:
    """The job arguments again, as ``pydra run`` on every rank must get them."""
    words = [args.target, *args.inputs] if args.target else []
    if getattr(args, "serve", False):
        words += ["--serve", "--listen", f"{args.listen[0]}:{args.listen[1]}", "--max-jobs", str(args.max_jobs)]
    for flag, value in (("--output", args.output), ("--run-dir", args.run_dir), ("--resume", args.resume)):
        if value:
            words += [flag, value]
    return words + (["--no-journal"] if args.no_journal else []) + (["--isolate"] if args.isolate else [])


def resume_with(launcher: list[str], args: argparse.Namespace) -> str:
    """The command that resumes this job, less ``--resume DIR``: *launcher*, and ``--isolate`` if given."""
    return shlex.join([*launcher, *(["--isolate"] if args.isolate else [])])


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a service cluster (``pydra serve``, ``pydra run --serve``, ``pydra launch --serve``)."""
    parser.add_argument(
        "--listen", type=_address, default=("127.0.0.1", 0), metavar="ADDR:PORT",
        help="where rank 0 serves the admin shell (default 127.0.0.1 and a free port; loopback unless you say so)",
    )
    parser.add_argument("--max-jobs", type=_positive("jobs"), default=4, metavar="N", help="jobs that run at once (default 4)")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT (port 0 for any free one), got {text!r}")
    return host.strip("[]"), int(port)


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from pydra import batch

    if not args.no_isolate:
        os.environ["PYDRA_ISOLATE"] = "1"  # a service runs anyone's code for a long time: isolate by default
    if args.ranks is not None:
        return batch.run_locally(args.ranks, _without_ranks(argv[1:]), command="serve")
    from pydra.service import run_service

    return run_service(args.run_dir, args.listen, args.max_jobs, None)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from pydra import batch

    if args.serve:
        if args.resume or args.no_journal or args.output:
            print("pydra run: error: --serve takes no --resume, --no-journal or --output", file=sys.stderr)
            return batch.EXIT_USAGE
        if not args.isolate:
            os.environ["PYDRA_ISOLATE"] = "1"
        if args.ranks is not None:
            return batch.run_locally(args.ranks, _without_ranks(argv[1:]))
        from pydra.service import run_service

        first = [args.target, *args.inputs] if args.target else None
        return run_service(args.run_dir, args.listen, args.max_jobs, first)
    if not check_job_arguments(args, "pydra run"):
        return batch.EXIT_USAGE
    if args.ranks is not None:
        resume = resume_with(["pydra", "run", "-n", str(args.ranks)], args)
        return batch.run_locally(args.ranks, _without_ranks(argv[1:]), resume_with=resume)
    request = batch.JobRequest(args.target, args.inputs, args.output, args.run_dir, args.resume, not args.no_journal)
    return batch.run_job(request)


def _without_ranks(argv: list[str]) -> list[str]:
    """*argv* minus its ``-n N`` / ``--ranks N`` / ``--ranks=N`` option (INPUTs untouched)."""
    kept: list[str] = []
    skip = False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("-n", "--ranks"):
            skip = True
        elif arg.startswith("--ranks=") or (arg.startswith("-n") and arg[2:].isdigit()):
            pass
        elif arg == "--":
            kept.extend(argv[index:])
            break
        else:
            kept.append(arg)
    return kept


#: seconds the ranks other than 0 wait before leaving over a bad setting, so that rank 0's line is not lost
SILENT_RANKS_WAIT = 1.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pydra`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOB_COMMANDS and (problem := check_settings()) is not None:
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":  # once per job
            print(f"pydra: error: {problem}", file=sys.stderr)
        else:
            # Open MPI stops every rank once one exits non-zero, and drops what they had yet to
            # write: leave rank 0 time to say why (it lost the line 4 times in 20 on a busy box).
            time.sleep(SILENT_RANKS_WAIT)
        return 2
    if argv and argv[0] in SELF_PARSING:  # these parse their own (ssh-style) options
        module, function = SELF_PARSING[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    parser = build_parser()
    command = _subparsers(parser).get(argv[0]) if argv else None
    if command is None:  # --help, --version, or a mistake argparse explains
        args = parser.parse_args(argv)
    else:
        # Options may come anywhere among the positionals: `run TARGET --output X IN1 IN2`.
        args = command.parse_intermixed_args(argv[1:])
    try:
        return args.handler(args, argv)
    except SealConfigError as exc:  # raised on every rank at start-up; one of them says why
        if exc.report:
            print(f"pydra: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from pydra.launcher.mpiexec import NO_MPI_LIBRARY, no_mpi_library

        if not no_mpi_library(exc):
            raise
        print(f"pydra: error: {NO_MPI_LIBRARY}", file=sys.stderr)
        return 1
    finally:
        # However this rank ends from here (a bad TARGET every rank agreed on, the job's end), it is
        # not lost: a supervised rank that leaves during start-up without saying so ends the job.
        startup.left()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
