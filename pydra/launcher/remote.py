"""Running one command on a node through its agent: the two sides of the exec protocol.

After the channel (``purpose="launch"``) is established, the launcher side
(:func:`client_exec`) sends one JSON request and the agent side
(:func:`server_exec`) starts the command and streams it back:

==========================================  =========================================
launcher -> agent                           agent -> launcher
==========================================  =========================================
``{"type": "exec", "command": "...",``      ``{"type": "started", "pid": N}``
``"env": {...}}`` (run by ``/bin/sh -c``)   ``{"type": "stdout"|"stderr", "data": B64}``
``{"type": "stdin", "data": B64}``          ``{"type": "exit", "status": N}`` (then close)
``{"type": "stdin_eof"}``
``{"type": "ping"}`` (instead of exec)      ``{"type": "pong"}`` (then close)
==========================================  =========================================

If the launcher disconnects before the command ends, the agent kills the
command's whole process group: nothing started through an agent outlives
the launcher that asked for it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import sys
from pydra.comm.aio import Channel, ChannelClosed
from pydra.comm.channel import ChannelError
from pydra.launcher import keys

log = logging.getLogger("pydra.node")

READ_SIZE = 64 * 1024


async def server_exec(channel: Channel) -> None:
    """Agent side: serve one request on an authenticated channel."""
    request = await channel.recv_json()
    if request.get("type") == "ping":
        await channel.send_json({"type": "pong"})
        return
    if request.get("type") != "exec" or not isinstance(request.get("command"), str):
        await channel.send_json({"type": "error", "message": "expected an exec or ping request"})
        return
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    process = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", request["command"],
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, start_new_session=True,  # its own process group, so it can be stopped whole
    )
    log.info("started pid %d (its own process group) for %s", process.pid, keys.sha256_fingerprint(channel.peer_key))
    await channel.send_json({"type": "started", "pid": process.pid})
    pumps = [
        asyncio.ensure_future(_pump_out(process.stdout, "stdout", channel)),
        asyncio.ensure_future(_pump_out(process.stderr, "stderr", channel)),
    ]
    feeder = asyncio.ensure_future(_feed_stdin(channel, process))
    try:
        await asyncio.gather(*pumps)
        status = await process.wait()
        await channel.send_json({"type": "exit", "status": _exit_status(status)})
    finally:
        feeder.cancel()
        if process.returncode is None:
            _kill_group(process.pid)
            await process.wait()


async def client_exec(channel: Channel, command: str, env: dict[str, str] | None = None) -> int:
    """Launcher side: run *command* through the agent, relaying our stdio; its exit status."""
    await channel.send_json({"type": "exec", "command": command, "env": env or {}})
    loop = asyncio.get_running_loop()
    stdin_task = asyncio.ensure_future(_forward_stdin(channel, loop))
    try:
        while True:
            message = await channel.recv_json()
            kind = message.get("type")
            if kind in ("stdout", "stderr"):
                stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
                stream.write(base64.b64decode(message["data"]))
                stream.flush()
            elif kind == "exit":
                return int(message["status"])
            elif kind == "error":
                raise ChannelError(f"agent refused the request: {message.get('message')}")
    finally:
        stdin_task.cancel()


async def _pump_out(stream: asyncio.StreamReader, kind: str, channel: Channel) -> None:
    while data := await stream.read(READ_SIZE):
        await channel.send_json({"type": kind, "data": base64.b64encode(data).decode()})


async def _feed_stdin(channel: Channel, process: asyncio.subprocess.Process) -> None:
    """Pass the launcher's stdin on; when the launcher goes away, stop the command."""
    try:
        while True:
            message = await channel.recv_json()
            if message.get("type") == "stdin":
                process.stdin.write(base64.b64decode(message["data"]))
                await process.stdin.drain()
            elif message.get("type") == "stdin_eof":
                process.stdin.close()
    except (ChannelClosed, ChannelError, ConnectionError):
        _kill_group(process.pid)


async def _forward_stdin(channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):  # no usable stdin (closed, or a file we cannot watch)
        await channel.send_json({"type": "stdin_eof"})
        return
    while data := await reader.read(READ_SIZE):
        await channel.send_json({"type": "stdin", "data": base64.b64encode(data).decode()})
    await channel.send_json({"type": "stdin_eof"})


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_status(status: int) -> int:
    """A shell-style status: 128 + N for a process killed by signal N."""
    return 128 - status if status < 0 else status

