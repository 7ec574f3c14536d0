"""Forwarding a process manager's control connection through an agent channel, as ``ssh -R`` would.

MPICH's Hydra has every proxy dial back to ``mpiexec --control-port HOST:PORT``
in the clear, and that port accepts anyone. Pydra keeps that traffic inside the
authenticated channel instead (docs/SECURITY.md):

- ``pydra-remote-exec``, on the launching host, replaces the control address in
  the proxy's command with :data:`PLACEHOLDER` and asks for a tunnel;
- the agent listens on a loopback port of its own host, puts that address in
  the command, starts it, and accepts exactly one connection, and only from a
  process of the command's own process group (:func:`accept_from_group`);
- both ends then copy bytes between that connection and the channel
  (``{"type": "tunnel", "data": B64}``, ``{"type": "tunnel_eof"}``);
  ``pydra-remote-exec`` connects to mpiexec's port, which is reachable on the
  launching host's private loopback only (:mod:`pydra.launcher.netns`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from pathlib import Path

from pydra.comm.aio import Channel
from pydra.comm.channel import ChannelError, UsageError

log = logging.getLogger("pydra.node")

#: what pydra-remote-exec puts in the command where the agent's loopback address goes
PLACEHOLDER = "@PYDRA_TUNNEL@"
READ_SIZE = 64 * 1024
#: how long the agent waits for the started command to connect to the tunnel
CONNECT_WAIT = 120.0


def rewrite_control_port(words: list[str]) -> tuple[list[str], tuple[str, int] | None]:
    """Hydra proxy arguments with ``--control-port`` pointed at the tunnel; and where it pointed."""
    words = list(words)
    for i, word in enumerate(words[:-1]):
        if word.strip('"') == "--control-port":
            host, _, port = words[i + 1].rpartition(":")
            words[i + 1] = PLACEHOLDER
            return words, (host, int(port))
    return words, None


def listen_loopback() -> socket.socket:
    """A listening socket on a free port of this host's loopback."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    return listener


async def accept_from_group(listener: socket.socket, pgid: int, timeout: float = CONNECT_WAIT) -> socket.socket:
    """The first connection to *listener* made by a process of group *pgid*; others are refused.

    A loopback port is open to every user of the host, so who connects is
    checked against the kernel's socket tables, not trusted: a stranger that
    connects first is logged, closed unanswered, and the wait goes on.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"the started command did not connect to its tunnel within {timeout:g} s")
        connection, address = await asyncio.wait_for(loop.sock_accept(listener), remaining)
        if connection_pgid(connection) == pgid:
            return connection
        log.warning("refused a connection to a job's tunnel from %s:%d: not from the job's process group", *address)
        connection.close()


def connection_pgid(connection: socket.socket) -> int | None:
    """The process group of the process holding the other end of a loopback TCP *connection*."""
    inode = _peer_inode(connection)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return os.getpgid(int(pid))
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _peer_inode(connection: socket.socket) -> int | None:
    """The inode of the socket at the other end of *connection*, from /proc/net/tcp."""
    here_port = connection.getsockname()[1]
    peer_port = connection.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == peer_port and int(remote.split(":")[1], 16) == here_port:
            return int(inode)
    return None


async def pump(sock: socket.socket, channel: Channel) -> None:
    """Copy what *sock* receives into the channel as tunnel messages, then a tunnel_eof."""
    loop = asyncio.get_running_loop()
    try:
        try:
            while data := await loop.sock_recv(sock, READ_SIZE):
                await channel.send_json({"type": "tunnel", "data": base64.b64encode(data).decode()})
        except OSError:  # reset, or closed under us: an end of file all the same
            pass
        await channel.send_json({"type": "tunnel_eof"})
    except (ChannelError, UsageError):
        pass  # the channel is over, and with it the job on that host


async def linger(sock: socket.socket, seconds: float) -> None:
    """End our side of *sock* and read, discarding, until the peer closes too (at most *seconds*).

    For mpiexec's end of a proxy's tunnel once the proxy is gone. Hydra
    signals every proxy whose connection it has not yet seen end (SIGUSR1 as
    each rank ends, under ``-disable-auto-cleanup``): a socket closed here
    with those bytes arriving answers with a reset, and on that write error
    mpiexec fails the whole job (exit 255) after it has succeeded.
    """
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        while await loop.sock_recv(sock, READ_SIZE):
            pass

    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # (again, if the proxy's end of file did already)
    try:
        await asyncio.wait_for(drain(), seconds)
    except (OSError, asyncio.TimeoutError):
        pass  # reset or gone: nothing more to spare it; or mpiexec is stuck, and its own end will come


async def deliver(sock: socket.socket, message: dict) -> None:
    """Carry out one tunnel message received from the channel on *sock*."""
    try:
        if message["type"] == "tunnel":
            await asyncio.get_running_loop().sock_sendall(sock, base64.b64decode(message["data"]))
        else:  # tunnel_eof: the far end stopped sending
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # this end is closed: the process behind it is gone, and its exit tells the rest
