"""Keeping ``mpiexec``'s control port out of reach: a private network namespace, and a way out of it.

Hydra's mpiexec listens on every interface (``INADDR_ANY``) for its proxies,
and accepts whoever greets it. ``pydra launch`` therefore starts mpiexec in a
network namespace of its own (an unprivileged user namespace maps our uid to
itself), where the only interface is a private loopback: no process outside,
on this host or any other, can reach that port.

The only way out of the namespace is the :class:`Connector`, a Unix socket in
a directory only we can enter (Unix sockets are reached through the file
system, which the namespaces share). ``pydra-remote-exec``, run by mpiexec
inside the namespace, sends it a host name; the connector, outside, opens a
TCP connection to that host's agent, and only to the agents of the job's hostfile,
and hands the connected socket back over ``SCM_RIGHTS``. The channel to the
agent is then authenticated and encrypted by ``pydra-remote-exec`` as before.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from pydra.launcher.private import PrivateSocketServer

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CONNECT_TIMEOUT = 10.0


class NamespaceError(OSError):
    """This host does not let us make a private network namespace."""


def isolate() -> None:
    """Move this process into new user and network namespaces, with loopback up.

    Meant as ``preexec_fn`` of the mpiexec subprocess; raises
    :class:`NamespaceError` if the kernel refuses (then mpiexec is not started).
    """
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NamespaceError(errno, f"cannot create a private network namespace: {os.strerror(errno)}")
    # In the new user namespace we are our own uid and gid, nothing more.
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(probe, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


class Connector(PrivateSocketServer):
    """Outside the namespace: connects to the job's agents for ``pydra-remote-exec`` inside it."""

    timeout = CONNECT_TIMEOUT

    def __init__(self, agents: Iterable[tuple[str, int]], directory: str | None = None) -> None:
        self.agents = {(host, int(port)) for host, port in agents}
        super().__init__("pydra-connect-", "connect", directory)

    def answer(self, client: socket.socket, ours: bool) -> None:
        host, _, port = client.recv(1024).decode(errors="replace").strip().rpartition(" ")
        if not ours:
            client.sendall(b"refused: not the launching user")
            return
        if not port.isdigit() or (host, int(port)) not in self.agents:
            client.sendall(f"refused: {host}:{port} is not an agent of this job".encode())
            return
        try:
            agent = socket.create_connection((host, int(port)), CONNECT_TIMEOUT)
        except OSError as exc:
            client.sendall(f"cannot reach the agent on {host}: {exc}".encode())
            return
        with agent:
            socket.send_fds(client, [b"ok"], [agent.fileno()])


def connect_through(path: str, host: str, port: int) -> socket.socket:
    """Inside the namespace: a TCP connection to the agent at *host*:*port*, made by the :class:`Connector` at *path*."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(CONNECT_TIMEOUT * 2)
        client.connect(path)
        client.sendall(f"{host} {port}".encode())
        message, fds, _, _ = socket.recv_fds(client, 1024, 1)
    if message != b"ok" or not fds:
        raise ConnectionError(message.decode(errors="replace") or "the launcher's connector closed")
    agent = socket.socket(fileno=fds[0])
    agent.setblocking(False)
    return agent
