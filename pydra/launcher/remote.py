"""Running one command on a node through its agent: the two sides of the exec protocol.

After the channel (``purpose="launch"``) is established, the launcher side
(:func:`client_exec`) sends one JSON request and the agent side
(:func:`server_exec`) starts the command and streams it back:

==========================================  =========================================
launcher -> agent                           agent -> launcher
==========================================  =========================================
``{"type": "exec", "command": "...",``      ``{"type": "started", "pid": N}``
``"env": {...}, "user": "..."}``            ``{"type": "stdout"|"stderr", "data": B64}``
``{"type": "stdin", "data": B64}``          ``{"type": "exit", "status": N}`` (then close)
``{"type": "stdin_eof"}``                   ``{"type": "error", "message": "..."}`` (refused)
``{"type": "ping", "user": "..."}``         ``{"type": "pong", "user": "..."}`` (then close)
``{"type": "tunnel", "data": B64}``         ``{"type": "tunnel", "data": B64}``
``{"type": "tunnel_eof"}``                  ``{"type": "tunnel_eof"}``
==========================================  =========================================

Who runs the command, with which environment, is the agent's *runner*'s
decision: :class:`OwnUser` (``pydra node``: the agent's own user and
environment plus the request's ``env``; ``user`` is ignored) or
:class:`pydra.launcher.privsep.SystemUsers` (``pydra node --system``: the user
the request names, if that user's ``authorized_keys`` allows the key, with a
clean environment). Either way the agent logs every command it runs, with the
user, the launcher's key fingerprint and address.

An exec request with ``"tunnel": true`` forwards one connection: the agent
puts a loopback address of its own host where the command says
``@PYDRA_TUNNEL@``, and the bytes of the connection the command makes there
travel as tunnel messages (see :mod:`pydra.launcher.tunnel`).

If the launcher disconnects before the command ends, the agent stops the
command's whole tree (SIGTERM, then SIGKILL :data:`STOP_GRACE` seconds later:
:func:`pydra.launcher.proctree.stop_tree`): nothing started through an agent
outlives the launcher that asked for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import pwd
import socket
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from pydra.comm.aio import Channel, ChannelClosed
from pydra.comm.channel import ChannelError
from pydra.launcher import keys, proctree, tunnel

log = logging.getLogger("pydra.node")

READ_SIZE = 64 * 1024
#: how long an end waits for its peer to close first: the agent (after sending the exit status) for the
#: launcher, and the launcher (after receiving it) for mpiexec's end of the tunnel (:func:`tunnel.linger`)
LINGER = 10.0
#: how much of a command the log line that records it keeps
LOGGED_COMMAND = 2000
#: seconds a command whose launcher went away has, after SIGTERM, to end before SIGKILL: enough for MPI's
#: daemons to stop their ranks and remove their files, short enough that nothing of the job runs on for long
STOP_GRACE = 5.0


class Refused(Exception):
    """The agent will not serve a request; the message, one line, goes to the launcher."""


@dataclass(frozen=True)
class Command:
    """How the agent starts a request's command: ``[shell, "-c", command]`` with *env*."""

    shell: str
    env: dict[str, str]
    who: str  #: who it runs as, for the log: ``bob (uid 1001)``
    options: dict[str, Any] = field(default_factory=dict)  #: more for subprocess (user=, group=, cwd=...)
    user: str | None = None  #: the name of the user it runs as (None: a uid with no name), told in the pong


class Runner(Protocol):
    """Decides who runs a request, and how (see the module's docstring)."""

    #: seconds an accepted client has to send its request (None: no limit)
    request_timeout: float | None

    def prepare(self, channel: Channel, request: dict[str, Any]) -> Command:
        """How to run *request* (an exec or a ping) from *channel*; :class:`Refused` if it may not run."""


class OwnUser:
    """Single-user mode: every command runs as the agent itself, with its environment plus the request's."""

    request_timeout = None

    def __init__(self) -> None:
        uid = os.geteuid()
        try:
            self.user: str | None = pwd.getpwuid(uid).pw_name
            self.who = f"{self.user} (uid {uid}, the agent's own user)"
        except KeyError:  # a uid with no passwd entry (some containers)
            self.user = None
            self.who = f"uid {uid} (the agent's own user)"

    def prepare(self, channel: Channel, request: dict[str, Any]) -> Command:
        """The agent's environment plus the request's ``env``; ``/bin/sh``; the request's ``user`` is ignored."""
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
        return Command("/bin/sh", env, self.who, user=self.user)


async def server_exec(channel: Channel, runner: Runner) -> None:
    """Agent side: serve one request on an authenticated channel, run as *runner* says."""
    try:
        request = await asyncio.wait_for(channel.recv_json(), runner.request_timeout)
    except asyncio.TimeoutError:
        log.warning("no request from %s within %s s: closing", channel.peer_address, runner.request_timeout)
        return
    if request.get("type") not in ("exec", "ping") or (
        request["type"] == "exec" and not isinstance(request.get("command"), str)
    ):
        await channel.send_json({"type": "error", "message": "expected an exec or ping request"})
        return
    try:
        how = runner.prepare(channel, request)
    except Refused as refusal:
        await channel.send_json({"type": "error", "message": str(refusal)})
        return
    if request["type"] == "ping":
        # Who the commands would run as: the launcher checks it against a hostfile's user@host.
        await channel.send_json({"type": "pong", **({"user": how.user} if how.user else {})})
        return
    command, listener = request["command"], None
    fingerprint = keys.sha256_fingerprint(channel.peer_key)
    # JSON-quoted, so that a newline in the command cannot forge a log line.
    logged = json.dumps(command[:LOGGED_COMMAND]) + (" (cut)" if len(command) > LOGGED_COMMAND else "")
    if request.get("tunnel"):
        listener = tunnel.listen_loopback()
        command = command.replace(tunnel.PLACEHOLDER, "127.0.0.1:%d" % listener.getsockname()[1])
    try:
        process = await asyncio.create_subprocess_exec(
            how.shell, "-c", command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=how.env, start_new_session=True,  # its own process group, so it can be stopped whole
            **how.options,
        )
    except OSError as exc:  # the shell or the home directory is missing, say
        if listener is not None:
            listener.close()
        log.warning("could not start a command as %s for %s from %s: %s: %s",
                    how.who, fingerprint, channel.peer_address, exc, logged)
        await channel.send_json({"type": "error", "message": f"could not start the command: {exc.strerror or exc}"})
        return
    log.info("started pid %d (its own process group) as %s for %s from %s: %s",
             process.pid, how.who, fingerprint, channel.peer_address, logged)
    await channel.send_json({"type": "started", "pid": process.pid})
    pumps = [
        asyncio.ensure_future(_pump_out(process.stdout, "stdout", channel)),
        asyncio.ensure_future(_pump_out(process.stderr, "stderr", channel)),
    ]
    forwarded: asyncio.Future[socket.socket] | None = None
    tunnel_pumps: list[asyncio.Task] = []
    if listener is not None:
        forwarded = asyncio.ensure_future(_accept_tunnel(listener, process.pid, channel, tunnel_pumps))
    stopping: asyncio.Task | None = None

    async def stop_tree() -> None:
        # (once the command has ended, its pid may be another process's: only what is left of its group)
        stopped = await proctree.stop_tree(process.pid, STOP_GRACE, process.returncode is None)
        if stopped.found:
            log.warning("pid %d: its channel from %s ended before the command did: %d processes asked to stop "
                        "(SIGTERM), %d of them killed %g s later", process.pid, channel.peer_address, stopped.found,
                        stopped.killed, STOP_GRACE)

    def stop() -> None:
        nonlocal stopping
        if stopping is None:
            stopping = asyncio.ensure_future(stop_tree())

    feeder = asyncio.ensure_future(_feed_stdin(channel, process, forwarded, stop))
    try:
        await asyncio.gather(*pumps)
        status = await process.wait()
        log.info("pid %d ended with status %d", process.pid, _exit_status(status))
        # What the command wrote to its tunnel just before exiting goes out before "exit".
        await asyncio.gather(*tunnel_pumps)
        await channel.send_json({"type": "exit", "status": _exit_status(status)})
        # Let the launcher close first: closing with its last tunnel bytes unread would make
        # our kernel answer with a reset, which can destroy the exit message in flight.
        await asyncio.wait([feeder], timeout=LINGER)
    finally:
        feeder.cancel()
        if forwarded is not None:
            forwarded.cancel()
            if forwarded.done() and not forwarded.cancelled() and forwarded.exception() is None:
                forwarded.result().close()
        if process.returncode is None:
            stop()
        if stopping is not None:
            await stopping
        await process.wait()


async def _accept_tunnel(listener: socket.socket, pgid: int, channel: Channel, pumps: list[asyncio.Task]) -> socket.socket:
    """Wait for the command's one connection to the tunnel, then pump it into the channel."""
    try:
        connection = await tunnel.accept_from_group(listener, pgid)
    except TimeoutError as exc:
        log.warning("%s", exc)
        proctree.kill_tree(pgid)
        raise
    finally:
        listener.close()  # one connection only: nothing else of the job listens here
    pumps.append(asyncio.ensure_future(tunnel.pump(connection, channel)))
    return connection


async def client_exec(
    channel: Channel,
    command: str,
    env: dict[str, str] | None = None,
    tunnel_to: tuple[str, int] | None = None,
    user: str | None = None,
) -> int:
    """Launcher side: run *command* through the agent, relaying our stdio; its exit status.

    With *tunnel_to*, the command's connection to ``@PYDRA_TUNNEL@`` is carried
    to that address, which this side connects to when the first bytes arrive.
    *user* is the user to run as on a system agent (default: our login name).
    """
    await channel.send_json({"type": "exec", "command": command, "env": env or {}, "tunnel": tunnel_to is not None,
                             "user": user or login_name()})
    loop = asyncio.get_running_loop()
    stdin_task = asyncio.ensure_future(_forward_stdin(channel, loop))
    forwarded: socket.socket | None = None
    pump: asyncio.Future | None = None
    try:
        while True:
            message = await channel.recv_json()
            kind = message.get("type")
            if kind in ("stdout", "stderr"):
                stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
                # mpiexec may stop reading us as the job ends: that loses the last output, not the
                # host (an OSError escaping here would make us stop the job as if the host were lost).
                with contextlib.suppress(BrokenPipeError):
                    stream.write(base64.b64decode(message["data"]))
                    stream.flush()
            elif kind in ("tunnel", "tunnel_eof") and tunnel_to is not None:
                if forwarded is None:
                    forwarded = await _connect(tunnel_to)
                    pump = asyncio.ensure_future(tunnel.pump(forwarded, channel))
                await tunnel.deliver(forwarded, message)
            elif kind == "exit":
                if forwarded is not None and pump is not None:
                    pump.cancel()  # the proxy is gone: what mpiexec still sends it goes nowhere
                    await tunnel.linger(forwarded, LINGER)
                return int(message["status"])
            elif kind == "error":
                raise ChannelError(f"agent refused the request: {message.get('message')}")
    finally:
        stdin_task.cancel()
        if forwarded is not None:
            forwarded.close()


def login_name() -> str:
    """This process's user name, the user a launch runs as on a system agent unless a hostfile says ``user@host``."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid with no passwd entry: the name the environment gives, as getpass does
        return os.environ.get("LOGNAME") or os.environ.get("USER") or str(os.getuid())


async def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def _pump_out(stream: asyncio.StreamReader, kind: str, channel: Channel) -> None:
    while data := await stream.read(READ_SIZE):
        await channel.send_json({"type": kind, "data": base64.b64encode(data).decode()})


async def _feed_stdin(
    channel: Channel,
    process: asyncio.subprocess.Process,
    forwarded: asyncio.Future[socket.socket] | None,
    stop: Callable[[], None],
) -> None:
    """Pass the launcher's stdin (and tunnel bytes) on; when the launcher goes away, *stop* the command."""
    try:
        while True:
            message = await channel.recv_json()
            kind = message.get("type")
            if kind == "stdin":
                process.stdin.write(base64.b64decode(message["data"]))
                await process.stdin.drain()
            elif kind == "stdin_eof":
                process.stdin.close()
            elif kind in ("tunnel", "tunnel_eof") and forwarded is not None:
                await tunnel.deliver(await forwarded, message)
    except (ChannelClosed, ChannelError, OSError):
        stop()


async def _forward_stdin(channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
    """Send our stdin to the command as it comes, then its end.

    Hydra gives the ssh of its first proxy a pipe (mpiexec's stdin, for rank 0);
    prterun gives every ssh /dev/null. A pipe, socket or terminal is watched by
    the event loop; anything else (a regular file, /dev/null) cannot be (epoll
    refuses it) but never blocks a read for long either, so a thread reads it.
    """
    read = await _stdin_reader(loop)
    # A broken channel is the main loop's to report: this task, which nobody awaits, ends quietly.
    with contextlib.suppress(ChannelError, OSError):
        while data := await _read_or_end(read):
            await channel.send_json({"type": "stdin", "data": base64.b64encode(data).decode()})
        await channel.send_json({"type": "stdin_eof"})


async def _read_or_end(read: Callable[[], Awaitable[bytes]]) -> bytes:
    """The next bytes of our stdin; b"" once it ends or breaks (EIO from a terminal we lost, say)."""
    try:
        return await read()
    except OSError:
        return b""


async def _stdin_reader(loop: asyncio.AbstractEventLoop) -> Callable[[], Awaitable[bytes]]:
    """A coroutine function that gives our stdin's next bytes (b"" at its end)."""
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):  # no stdin at all (closed, or never opened)
        return _nothing
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return lambda: reader.read(READ_SIZE)
    return lambda: asyncio.to_thread(os.read, fd, READ_SIZE)


async def _nothing() -> bytes:
    return b""


def _exit_status(status: int) -> int:
    """A shell-style status: 128 + N for a process killed by signal N."""
    return 128 - status if status < 0 else status
