"""A Unix socket that serves this user's processes alone, for the life of one launch.

The launcher lends its helpers (``pydra-remote-exec``, started by mpiexec)
what they cannot have themselves: a connection out of mpiexec's network
namespace (:class:`pydra.launcher.netns.Connector`) and signatures by the
user's key (:class:`pydra.launcher.sshagent.KeyLender`). Both listen the same
way: a socket in a fresh directory of mode 0700, one thread per client, and
the client's uid (as the kernel says) checked before anything is given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading


class PrivateSocketServer:
    """Serves clients of a Unix socket at :attr:`path` until closed; subclasses :meth:`answer` them."""

    #: seconds a client may take to say what it wants
    timeout = 10.0

    def __init__(self, prefix: str, name: str, directory: str | None = None) -> None:
        """Listen at *name* in *directory* (private: a launch's :class:`~pydra.launcher.scratch.Scratch`), or in
        a new directory of mode 0700 named *prefix*..., removed on :meth:`close`."""
        self._own_directory = directory is None
        self._directory = tempfile.mkdtemp(prefix=prefix) if directory is None else directory
        self.path = os.path.join(self._directory, name)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(64)
        threading.Thread(target=self._serve, name=prefix.strip("-"), daemon=True).start()

    def answer(self, client: socket.socket, ours: bool) -> None:
        """Serve *client*; *ours*: whether it runs as this user (root aside, who could read our memory anyway)."""
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed: the job is over
                return
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        with client:
            client.settimeout(self.timeout)
            uid = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            self.answer(client, uid == os.getuid())

    def close(self) -> None:
        """Stop serving and remove the socket (and its directory, if it made it)."""
        self._server.close()
        if self._own_directory:
            shutil.rmtree(self._directory, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> "PrivateSocketServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
