"""The control endpoint of a service cluster: rank 0 serves it, ``pydra shell`` talks to it.

Both sides speak JSON over the authenticated channel of :mod:`pydra.comm.aio`
(purpose ``"admin"``). The client must hold a key that ``authorized_keys``
allows in the ``admin`` role; the server proves itself with a key made for
this cluster, whose fingerprint is in the *connection file*
(``~/.pydra/run/<cluster>.json``, mode 0600) that the shell reads. A request
is ``{"command": NAME, "args": {...}}``; the reply ``{"ok": true, "result":
...}`` or ``{"ok": false, "error": "one line"}``. A channel carries any
number of requests, one at a time.

:class:`ControlServer` runs in its own thread (``pydra-control``) on rank 0;
:class:`ControlClient` gives a blocking ``call`` over a background loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pydra import strictmodes
from pydra.comm.aio import Channel, ChannelClosed, open_channel, serve_channel
from pydra.comm.channel import ChannelError
from pydra.errors import PydraError
from pydra.launcher import authorized, keys

PURPOSE = "admin"

#: runtime settings an admin may change with ``config KEY VALUE``: name -> (type, what it does)
CONFIG = {
    "max_jobs": (int, "jobs that run at once, sharing the workers"),
    "heartbeat_timeout": (float, "seconds of silence after which a worker is declared lost"),
    "batch_seconds": (float, "target worker time of one adaptive batch (new streams)"),
    "retries": (int, "least retries of any failing unit of jobs started from now on (tasks may ask for more)"),
}

_log = logging.getLogger(__name__)


class ControlError(PydraError):
    """The cluster refused or failed a request; the message says why in one line."""


def connection_dir() -> Path:
    """Where running clusters leave their connection files: ``~/.pydra/run``."""
    return keys.pydra_home() / "run"


def newest_connection_file() -> Path:
    """The connection file of the newest local cluster that is still running.

    Strict modes: the directory must be yours and writable by you alone (else
    anyone could plant a cluster there), and so must the file be:
    :class:`~pydra.strictmodes.StrictModeError` otherwise.
    """
    directory = connection_dir()
    if directory.is_dir():
        strictmodes.check_directory(directory, private=True)
    files = sorted(directory.glob("*.json"), key=_modified, reverse=True)
    for path in files:
        try:
            pid = json.loads(strictmodes.read_bytes(path, strictmodes.Kind.OWN))["pid"]
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone, unreadable, or its rank 0 is gone
        return path
    raise ControlError(f"no running cluster has a connection file in {connection_dir()}: start one with `pydra serve`")


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile: its cluster stopped
        return 0.0


# -- rank 0's side --------------------------------------------------------------------------


class ControlServer:
    """Serves *handle(command, args)* to authorized admins, from a thread of its own."""

    def __init__(
        self,
        handle: Callable[[str, dict], Any],
        cluster_id: str,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        authorized_keys: Path | None = None,
    ) -> None:
        self.handle = handle
        self.cluster_id = cluster_id
        self.listen = listen
        self.authorized_keys = authorized_keys
        self.identity = Ed25519PrivateKey.generate()  # this cluster's own: pinned by the connection file
        self.address: tuple[str, int] | None = None
        self.connection_file = connection_dir() / f"{cluster_id}.json"
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()  # one per connected admin
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pydra-control", daemon=True)

    def start(self) -> Path:
        """Listen, write the connection file; return its path.

        Raises :class:`~pydra.strictmodes.StrictModeError` if others could write
        the directory of connection files, and ``OSError`` if it cannot listen.
        """
        connection_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
        # A directory others could write would let them swap the file the shell follows.
        strictmodes.check_directory(connection_dir(), private=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.connection_file

    def stop(self) -> None:
        """Stop listening, remove the connection file, and close the admins' channels.

        An admin whose request is being answered (``shutdown`` itself) gets
        its reply first: channels get a second to finish.
        """
        self.connection_file.unlink(missing_ok=True)
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    async def _close(self) -> None:
        self._server.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=1.0)
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._loop.run_until_complete(
                serve_channel(
                    self.listen[0],
                    self.listen[1],
                    self._serve,
                    identity=self.identity,
                    purpose=PURPOSE,
                    authorize_client=self._authorize,
                )
            )
            self._server = server
            self.address = server.sockets[0].getsockname()[:2]
            self._write_connection_file()
        except BaseException as exc:  # the port is taken, say: the caller hears it from start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _authorize(self, public_key: bytes, address: str) -> object:
        return authorized.authorize(public_key, address, "admin", path=self.authorized_keys)

    def _write_connection_file(self) -> None:
        assert self.address is not None
        details = {
            "cluster": self.cluster_id,
            "address": self.address[0],
            "port": self.address[1],
            "host_key": keys.sha256_fingerprint(self.identity.public_key()),
            "pid": os.getpid(),
            "started": time.time(),
        }
        temporary = self.connection_file.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(details, handle)
        os.replace(temporary, self.connection_file)

    async def _serve(self, channel: Channel) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    request = await channel.recv_json()
                except ChannelClosed:
                    return
                await channel.send_json(await self._answer(request))
        finally:
            self._handlers.discard(task)

    async def _answer(self, request: dict) -> dict:
        command, args = request.get("command"), request.get("args", {})
        if not isinstance(command, str) or not isinstance(args, dict):
            return {"ok": False, "error": "a request is {\"command\": NAME, \"args\": {...}}"}
        try:
            # The handlers take locks and may wait on the scheduler: keep this loop free.
            result = await asyncio.get_running_loop().run_in_executor(None, self.handle, command, args)
        except PydraError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug: say so rather than drop the admin's connection
            _log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error in {command}: {type(exc).__name__}: {exc}"}
        return {"ok": True, "result": result}


# -- the admin's side -----------------------------------------------------------------------


class ControlClient:
    """A blocking connection to a cluster's control endpoint (from its connection file)."""

    def __init__(self, connection_file: Path, identity: Ed25519PrivateKey, timeout: float = 30.0) -> None:
        try:
            # Strict modes: only a file of yours, in a directory only you can write, says where to connect.
            self.details = json.loads(strictmodes.read_bytes(connection_file, strictmodes.Kind.OWN))
            self.address, self.port, self.expected = (
                self.details["address"], int(self.details["port"]), self.details["host_key"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ControlError(f"cannot read the connection file {connection_file}: {exc}") from None
        self.identity = identity
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pydra-shell-io", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()  # one request at a time on the one channel
        self._channel: Channel | None = None
        self._run(self._connect())

    def call(self, command: str, **args: Any) -> Any:
        """Send one request and return its result; raise :class:`ControlError` with the cluster's reason."""
        with self._lock:
            reply = self._run(self._request({"command": command, "args": args}))
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "the cluster gave no reason"))
        return reply.get("result")

    def close(self) -> None:
        if self._channel is not None:
            try:
                self._run(self._channel.close())
            except ControlError:
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self, coroutine: Any) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout)
        except (OSError, ChannelError, TimeoutError, asyncio.TimeoutError) as exc:
            raise ControlError(f"lost the connection to the cluster at {self.address}:{self.port}: {exc or type(exc).__name__}") from None

    async def _connect(self) -> None:
        def verify_server(public_key: bytes) -> None:
            found = keys.sha256_fingerprint(public_key)
            if found != self.expected:
                raise ControlError(f"the cluster's key is {found}, but its connection file says {self.expected}")

        try:
            reader, writer = await asyncio.open_connection(self.address, self.port)
        except OSError as exc:
            raise ControlError(f"cannot reach the cluster at {self.address}:{self.port}: {exc.strerror or exc}") from None
        try:
            self._channel = await open_channel(
                reader, writer, identity=self.identity, purpose=PURPOSE, verify_server=verify_server
            )
        except ChannelError as exc:
            raise ControlError(f"the cluster refused this key ({keys.sha256_fingerprint(self.identity.public_key())}): {exc}") from None

    async def _request(self, message: dict) -> dict:
        assert self._channel is not None
        await self._channel.send_json(message)
        return await self._channel.recv_json()
