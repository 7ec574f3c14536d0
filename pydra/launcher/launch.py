"""``pydra launch``: authenticate every host's agent, then run the MPI job through them.

Every remote process of the job is started through an authenticated agent:
MPICH's ``mpiexec`` is told to use ``pydra-remote-exec`` instead of ssh
(``-launcher ssh -launcher-exec``), and Open MPI's ``prterun`` the same
through ``plm_rsh_agent``. That helper reads where the agents are, and which
identity and known_hosts to use, from ``PYDRA_AGENTS``, ``PYDRA_IDENTITY``,
``PYDRA_IDENTITY_AGENT`` and ``PYDRA_KNOWN_HOSTS``, which ``pydra launch``
sets for it. The helper never reads your key file: it signs through
``ssh-agent`` if your key is there, else through the launcher, which lends
the key it holds (decrypted once, if it has a passphrase) over the same
protocol for the job's lifetime (:mod:`pydra.launcher.sshagent`).

Under MPICH the job is sealed (docs/SECURITY.md): mpiexec runs in a private
network namespace (:mod:`pydra.launcher.netns`), each proxy's control
connection is forwarded through its agent's channel
(:mod:`pydra.launcher.tunnel`), and the ranks get a fresh per-job key,
``PYDRA_JOB_KEY``, with which they seal Pydra's own messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydra.cli import add_job_arguments, add_service_arguments, check_job_arguments, job_arguments, resume_with
from pydra.comm.aio import Channel, open_channel, retry_refused
from pydra.comm.channel import ChannelError, Identity
from pydra.config import setting
from pydra.errors import TargetError
from pydra.launcher import authorized, keys, netns, scratch, sshagent, tunnel
from pydra.launcher.environment import forwarded_names, job_environment, parse_env_option
from pydra.launcher.hostfile import (
    DEFAULT_AGENT_PORT, Host, HostfileError, allocation_source, hosts_from_environment, read_hostfile,
)
from pydra.launcher.identity import add_identity_arguments, load_identity, missing_file
from pydra.launcher.jobwatch import JobWatch
from pydra.launcher.mpiexec import MPICH, MPIExec, MPIExecError, find_mpiexec
from pydra.launcher.node import PURPOSE
from pydra.launcher.remote import client_exec, login_name
from pydra.strictmodes import StrictModeError
from pydra.target import parse_target

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class HostCheck:
    """The outcome of authenticating one host's agent."""

    host: Host
    fingerprint: str
    rtt: float | None
    problem: str | None


async def connect(host: str, port: int, identity, known_hosts: Path, accept_new: bool) -> Channel:
    """An authenticated channel to the agent at *host*:*port*, its key checked against known_hosts.

    Inside a sealed job's namespace (``PYDRA_CONNECTOR`` set) the TCP connection
    is made by the launcher's :class:`~pydra.launcher.netns.Connector`.
    """
    connector = setting("CONNECTOR")

    async def open_once() -> Channel:
        if connector:
            sock = await asyncio.get_running_loop().run_in_executor(None, netns.connect_through, connector, host, port)
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        return await open_channel(
            reader, writer, identity=identity, purpose=PURPOSE,
            verify_server=lambda key: authorized.check_host(host, port, key, accept_new, path=known_hosts),
        )

    def say_once(error: BaseException) -> None:
        # A penalised address's connections are held for the grace time, then dropped: each try takes seconds.
        if not told:
            told.append(error)
            print(f"pydra launch: the agent at {host}:{port} dropped our connection before the handshake (busy, or "
                  "penalising this address for failed logins: see its log); trying again", file=sys.stderr, flush=True)

    told: list[BaseException] = []
    # An agent under a flood drops some new connections before their handshake: try again.
    return await retry_refused(open_once, on_retry=say_once)


async def check_host(host: Host, identity, known_hosts: Path, accept_new: bool) -> HostCheck:
    """Authenticate *host*'s agent and time a ping over the channel."""
    try:
        channel = await connect(host.name, host.port, identity, known_hosts, accept_new)
        async with channel:
            started = time.perf_counter()
            await channel.send_json({"type": "ping", "user": host.user or login_name()})
            reply = await channel.recv_json()
            rtt = time.perf_counter() - started
            if reply.get("type") == "error":  # a system agent that will not run anything as that user
                raise ChannelError(f"agent refused: {reply.get('message')}")
            if reply.get("type") != "pong":
                raise ChannelError(f"expected pong, got {reply.get('type')!r}")
            runs_as = reply.get("user")
            if host.user and runs_as and runs_as != host.user:  # a single-user agent ignores the user asked for
                raise ChannelError(f"this agent runs everything as {runs_as}, not {host.user}: start `pydra node "
                                   f"--system` there, or write the host without {host.user}@")
            return HostCheck(host, keys.sha256_fingerprint(channel.peer_key), rtt, None)
    except ConnectionRefusedError:
        return HostCheck(host, "-", None, "no agent listening there (start `pydra node` on that host)")
    except (OSError, asyncio.TimeoutError, ChannelError, authorized.HostKeyError) as exc:
        return HostCheck(host, "-", None, str(exc) or type(exc).__name__)


def print_table(checks: list[HostCheck]) -> None:
    """The host table printed before the job starts."""
    rows = [("HOST", "AGENT", "HOST KEY", "SLOTS", "RTT", "STATUS")]
    for c in checks:
        rtt = f"{c.rtt * 1000:.1f} ms" if c.rtt is not None else "-"
        rows.append((c.host.label, f"{c.host.name}:{c.host.port}", c.fingerprint, str(c.host.slots), rtt,
                     "ok" if c.problem is None else f"FAILED: {c.problem}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1], file=sys.stderr)


def launch_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pydra launch`` and ``pydra-launch``."""
    parser = argparse.ArgumentParser(
        prog="pydra launch",
        description="Authenticate every host's Pydra agent, then run TARGET as an MPI job through them.",
        epilog="TARGET, INPUT and the job options are as in `pydra run`. Without a hostfile (and outside a "
               "Slurm or PBS allocation) the job runs on this host alone, like `pydra run -n N`. Inside an "
               "allocation the hosts and, without -n, the number of ranks are the allocation's.",
    )
    parser.add_argument("-f", "--hostfile", type=Path, metavar="HOSTFILE", help="hosts to run on")
    parser.add_argument("-n", "--ranks", type=int, metavar="N",
                        help="number of MPI ranks (default: the slots of the hostfile or of the allocation)")
    parser.add_argument("--agent-port", type=_port, default=DEFAULT_AGENT_PORT, metavar="PORT",
                        help=f"the port of the agent on every host of a Slurm or PBS allocation (default "
                             f"{DEFAULT_AGENT_PORT}; a hostfile says port=P per host instead)")
    add_identity_arguments(parser)
    parser.add_argument("--known-hosts", type=Path, default=authorized.known_hosts_path(), metavar="PATH",
                        help="pinned host keys (default ~/.pydra/known_hosts)")
    parser.add_argument("--accept-new", action="store_true",
                        help="trust and record the key of a host seen for the first time (a changed key is always refused)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="give the ranks this variable (its value here, or VALUE); repeatable. Nothing else of "
                             "this environment is forwarded but PYDRA_* and MPI's own settings. The resume "
                             "command names the variable, never its VALUE: set it in the shell that resumes")
    parser.add_argument("--iface", metavar="IFACE", default=setting("IFACE"),
                        help="the network interface MPI's connections between hosts use (default: MPI's choice)")
    add_job_arguments(parser)
    parser.add_argument("--serve", action="store_true", help="stay up as a service cluster (see pydra serve); TARGET, if any, is its first job")
    add_service_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if not check_job_arguments(args, "pydra launch"):
        return 2
    try:
        for text in args.env:
            parse_env_option(text)
        if args.target:  # its form, before any host is asked (the file is read where rank 0 runs)
            parse_target(args.target)
    except (ValueError, TargetError) as exc:
        print(f"pydra launch: error: {exc}", file=sys.stderr)
        return 2
    forwarded = job_arguments(args)

    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else hosts_from_environment(port=args.agent_port)
    except HostfileError as exc:
        print(f"pydra launch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pydra launch: error: cannot read the hostfile {args.hostfile}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    problem = check_ranks(args, hosts)
    if problem:
        print(f"pydra launch: error: {problem}", file=sys.stderr)
        return 2
    resume = resume_with(launch_words(args), args)
    if not hosts:
        from pydra.batch import run_locally

        return run_locally(args.ranks, forwarded, resume_with=resume)
    try:
        # Strict modes: a key or known_hosts someone else could write is refused before any connection.
        identity = load_identity(args.identity, args.passphrase_file)
        authorized.check_known_hosts(args.known_hosts)
    except StrictModeError as exc:
        print(f"pydra launch: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        where = "to the authorized_keys of the agent (`pydra node`) on every host"
        print(f"pydra launch: error: {missing_file(exc, args.identity, where)}", file=sys.stderr)
        return 2
    except (keys.KeyFileError, sshagent.AgentError, OSError) as exc:
        print(f"pydra launch: error: {exc}", file=sys.stderr)
        return 2

    async def check_all() -> list[HostCheck]:
        return await asyncio.gather(*(check_host(h, identity, args.known_hosts, args.accept_new) for h in hosts))

    try:
        checks = asyncio.run(check_all())
    except KeyboardInterrupt:
        print("pydra launch: interrupted before the job started", file=sys.stderr)
        return 128 + signal.SIGINT
    print_table(checks)
    if any(c.problem for c in checks):
        print("pydra launch: not starting the job: some hosts could not be reached or authenticated (STATUS above)",
              file=sys.stderr)
        return 1
    launch = Launch(hosts, args.ranks, identity, args.known_hosts, args.env, args.iface)
    return launch.run(forwarded, resume)


def launch_words(args: argparse.Namespace) -> list[str]:
    """``pydra launch`` and the options that say where and how this job runs (for its resume command)."""
    words = ["pydra", "launch"]
    if args.hostfile:
        words += ["-f", str(args.hostfile.resolve())]
    words += ["-n", str(args.ranks)]
    if args.identity:
        words += ["-i", str(args.identity)]
    if args.passphrase_file:
        words += ["--passphrase-file", str(args.passphrase_file)]
    if args.known_hosts != authorized.known_hosts_path():
        words += ["--known-hosts", str(args.known_hosts)]
    if args.agent_port != DEFAULT_AGENT_PORT:
        words += ["--agent-port", str(args.agent_port)]
    for text in args.env:
        # The name alone: a value (a token, say) must not be printed in the resume line, nor logged with it.
        # Resuming takes the variable from that shell's environment.
        words += ["--env", text.partition("=")[0]]
    return words + (["--iface", args.iface] if args.iface else [])


def _port(text: str) -> int:
    if not (text.isdigit() and 0 < int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def check_ranks(args: argparse.Namespace, hosts: list[Host] | None) -> str | None:
    """Settle ``args.ranks`` against *hosts*: the hosts' slots if not given; why not, as one line.

    Ranks beyond an allocation's tasks would share cores the batch system gave
    to other jobs, so they are refused; beyond a hostfile's slots, which are
    the user's own figure, they are only warned about.
    """
    if args.ranks is not None and not 0 < args.ranks <= 65535:
        return f"-n {args.ranks}: expected a positive number of ranks"
    if not hosts:
        return None if args.ranks is not None else "give -n N: there is no hostfile (-f) or allocation to take it from"
    slots = sum(host.slots for host in hosts)
    if args.ranks is None:
        args.ranks = slots
    elif args.ranks > slots and not args.hostfile:
        return (f"-n {args.ranks} is more than the {slots} tasks of this allocation ({allocation_source()}): "
                f"ask the batch system for more, or give -n {slots} or less")
    elif args.ranks > slots:
        print(f"pydra launch: warning: -n {args.ranks} is more than the {slots} slots of {args.hostfile}: "
              "some hosts run more ranks than their slots", file=sys.stderr)
    return None


@dataclass(frozen=True)
class Launch:
    """One MPI job started through the agents of *hosts*."""

    hosts: list[Host]
    ranks: int
    identity: Identity
    known_hosts: Path
    named_env: list[str]
    iface: str

    def run(self, forwarded: list[str], resume_with: str) -> int:
        """Run ``python -m pydra run FORWARDED...`` and return its exit status (see :func:`pydra.batch.wait_for`).

        *resume_with* is the command that resumes the job, less ``--resume DIR``.
        """
        # Every temporary file in one directory, which a later launch removes if this one is killed outright.
        with scratch.Scratch() as directory, sshagent.signing_socket(self.identity, directory.path) as agent:
            return self._run(forwarded, resume_with, agent, directory.path)

    def _run(self, forwarded: list[str], resume_with: str, agent: str, directory: str) -> int:
        from pydra.batch import ends_with_this_process, wait_for
        from pydra.progress import progress_mode

        try:
            mpiexec = find_mpiexec()
        except MPIExecError as exc:
            print(f"pydra launch: error: {exc}", file=sys.stderr)
            return 1
        # Under MPICH every host gets an alias in the machinefile: Hydra, inside its namespace,
        # then sees no host as local, and starts every proxy through an agent (localhost too).
        names = [f"pydra-host-{i}" for i in range(len(self.hosts))] if mpiexec.implementation == MPICH \
            else [h.name for h in self.hosts]
        agents = {name: (h.name, h.port, h.user or login_name()) for name, h in zip(names, self.hosts)}
        settings = {
            "PYDRA_PROGRESS": progress_mode(),
            "PYDRA_AGENTS": json.dumps(agents),
            "PYDRA_IDENTITY": keys.public_key_line(self.identity.public_key()),
            "PYDRA_IDENTITY_AGENT": agent,
            "PYDRA_KNOWN_HOSTS": str(self.known_hosts),
            "PYDRA_JOB_KEY": secrets.token_hex(32),  # fresh for every job; seals Pydra's messages
            "PYDRA_RESUME_WITH": resume_with,
        }
        if self.iface:
            settings.update(PYDRA_IFACE=self.iface, **interface_settings(self.iface))
        try:
            env = job_environment(os.environ, self.named_env, settings)
        except ValueError as exc:
            print(f"pydra launch: error: {exc}", file=sys.stderr)
            return 2
        program = [sys.executable, "-m", "pydra", "run", *forwarded]
        with open(os.path.join(directory, "hosts.txt"), "w") as machinefile:
            if mpiexec.implementation != MPICH:
                machinefile.write("".join(f"{name} slots={h.slots}\n" for name, h in zip(names, self.hosts)))
                machinefile.flush()
                command = self.open_mpi_command(mpiexec, machinefile.name, env, program)
                watch = JobWatch()  # prterun ends the job itself, but may call it a success
                status = wait_for(command, env, preexec_fn=ends_with_this_process(), stop_with=mpiexec.stop_signal,
                                  watch_stderr=watch)
                return watch.conclude(status)
            machinefile.write("".join(f"{name}:{h.slots}\n" for name, h in zip(names, self.hosts)))
            machinefile.flush()
            with netns.Connector(((host, port) for host, port, _ in agents.values()), directory) as connector:
                env["PYDRA_CONNECTOR"] = connector.path
                command = self.mpich_command(mpiexec, machinefile.name, env, program)
                watch = JobWatch()
                dies_with_us = ends_with_this_process()

                def isolated() -> None:  # mpiexec's preexec_fn: a network of its own, and our end is its end
                    netns.isolate()
                    dies_with_us()

                try:
                    status = wait_for(command, env, preexec_fn=isolated, watch_stderr=watch,
                                      stop_hard=watch.stop_proxies)
                except (netns.NamespaceError, subprocess.SubprocessError):
                    # (subprocess reports a failing preexec_fn without its message)
                    print("pydra launch: error: this host refuses a private network namespace (are unprivileged "
                          "user namespaces disabled?); the job is not started, since mpiexec's control port would "
                          "be open to the network (see docs/SECURITY.md)", file=sys.stderr)
                    return 1
                return watch.conclude(status)

    def mpich_command(self, mpiexec: MPIExec, machinefile: str, env: dict[str, str], program: list[str]) -> list[str]:
        """Hydra's mpiexec, in its namespace: control port on the private loopback, ranks via agents."""
        command = mpiexec.command(self.ranks, program)
        command[1:1] = [
            "-iface", "lo",  # the namespace's only interface: proxies are told 127.0.0.1:PORT
            "-genvlist", ",".join(forwarded_names(env, self.named_env)),
            "-launcher", "ssh", "-launcher-exec", helper_path(), "-f", machinefile,
        ]
        return command

    def open_mpi_command(self, mpiexec: MPIExec, hostfile: str, env: dict[str, str], program: list[str]) -> list[str]:
        """prterun through the agents; its daemons' own connections are not sealed (docs/SECURITY.md)."""
        command = mpiexec.command(self.ranks, program)
        flags = ["--mca", "plm_rsh_agent", helper_path(), "--hostfile", hostfile]
        for name in forwarded_names(env, self.named_env):
            if name != "PYDRA_JOB_KEY":  # prted would pass it on in the clear; pydra-remote-exec carries it
                flags += ["-x", name]
        if self.iface:
            flags += ["--mca", "btl_tcp_if_include", self.iface, "--mca", "oob_tcp_if_include", self.iface]
        command[1:1] = flags
        return command


def interface_settings(iface: str) -> dict[str, str]:
    """What tells MPICH's network modules (UCX, libfabric, ch3) to use *iface* between hosts."""
    return {
        "UCX_NET_DEVICES": iface,
        "FI_TCP_IFACE": iface,
        "FI_SOCKETS_IFACE": iface,
        "MPIR_CVAR_NEMESIS_TCP_NETWORK_IFACE": iface,
    }


def helper_path() -> str:
    """The ``pydra-remote-exec`` beside this Python."""
    return str(Path(sys.executable).parent / "pydra-remote-exec")


def remote_exec_main(argv: list[str] | None = None) -> int:
    """``pydra-remote-exec [-x] HOST COMMAND...``: what mpiexec calls instead of ssh."""
    words = list(sys.argv[1:] if argv is None else argv)
    while words and words[0].startswith("-"):  # ssh-style flags mpiexec adds (-x: no X11)
        words.pop(0)
    if len(words) < 2:
        print("pydra-remote-exec: usage: pydra-remote-exec [-x] HOST COMMAND...", file=sys.stderr)
        return 2
    host, tail = words[0], words[1:]
    tail, control = tunnel.rewrite_control_port(tail)
    if control is not None:  # a Hydra proxy: its control connection goes through the channel
        tail = _rewrite_iface(tail, setting("IFACE"))
        control = ("127.0.0.1", control[1])  # mpiexec's port, on the namespace's loopback
    command = " ".join(tail)
    agents = json.loads(setting("AGENTS"))
    if host not in agents:
        print(f"pydra-remote-exec: no agent known for host {host!r} (PYDRA_AGENTS)", file=sys.stderr)
        return 255
    host, port, user = agents[host]
    # Interrupted (mpiexec stopping the job, or Ctrl-C): leave at once. The kernel closes our
    # connection and the agent, seeing it end early, kills everything the command started.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda signum, frame: os._exit(128 + signum))
    if control is not None:
        # A terminal's Ctrl-C reaches mpiexec too, which stops the ranks through the proxy's
        # control connection: that is our tunnel, so it must outlive the Ctrl-C, or mpiexec
        # loses the ranks' exit statuses and may report the stopped job as a success.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Hydra may end without stopping us (when it fails to signal a proxy already gone,
        # say): then we go too, and the agent stops this host's part of the job.
        _end_with_parent()
    try:
        identity = remote_identity()
    except (StrictModeError, keys.KeyFileError, sshagent.AgentError, OSError) as exc:
        print(f"pydra-remote-exec: {exc}", file=sys.stderr)
        return 255
    known_hosts = Path(setting("KNOWN_HOSTS", str(authorized.known_hosts_path())))

    async def run() -> int:
        channel = await connect(host, int(port), identity, known_hosts, accept_new=False)
        try:
            # The job's key reaches the remote daemon (and so its ranks) inside the channel.
            key = {"PYDRA_JOB_KEY": os.environ["PYDRA_JOB_KEY"]} if "PYDRA_JOB_KEY" in os.environ else None
            return await client_exec(channel, command, env=key, tunnel_to=control, user=user)
        finally:
            # Once the exit status is in, the agent may close first: that is no failure.
            with contextlib.suppress(ChannelError):
                await channel.close()

    try:
        return asyncio.run(run())
    except (OSError, asyncio.TimeoutError, ChannelError, authorized.HostKeyError) as exc:
        # The host or its agent is gone: MPI may take minutes to notice a silent peer, so we
        # stop the job now by telling mpiexec (our parent) to shut it down everywhere.
        print(f"pydra-remote-exec: lost {host}: {exc}; stopping the job", file=sys.stderr)
        os.kill(os.getppid(), signal.SIGTERM)
        return 255


def _end_with_parent() -> None:
    """Have the kernel send us SIGTERM when our parent (Hydra's mpiexec, one thread) ends (Linux only)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # it ended before we asked
        os._exit(128 + signal.SIGTERM)


def remote_identity() -> Identity:
    """What ``pydra-remote-exec`` signs with: the key in ``PYDRA_IDENTITY_AGENT``, else ``PYDRA_IDENTITY``'s file."""
    agent = setting("IDENTITY_AGENT")
    if agent:
        return sshagent.AgentKey(agent, keys.load_public_key(setting("IDENTITY")))
    return load_identity(setting("IDENTITY") or None)


def _rewrite_iface(words: list[str], iface: str) -> list[str]:
    """Hydra's ``--iface lo`` (mpiexec's, in its namespace) made the proxy's: *iface*, or none."""
    words = list(words)
    if "--iface" in words:
        at = words.index("--iface")
        words[at : at + 2] = ["--iface", iface] if iface else []
    return words
