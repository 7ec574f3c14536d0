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
import concurrent.futures
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pydra import strictmodes
from pydra.comm.aio import Channel, ChannelClosed, HandshakeTimeout, open_channel, retry_refused, serve_channel
from pydra.comm.channel import ChannelError, Identity, Refused
from pydra.errors import PydraError
from pydra.launcher import authorized, keys, proctree

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


# -- what an admin may ask: the schema of requests ------------------------------------------


@dataclass(frozen=True)
class Request:
    """One admin command: the :class:`~pydra.service.Service` method that carries it out, and its fields.

    *fields* maps each field of ``args`` to its type in :data:`FIELD_TYPES`
    (a trailing ``?`` also allows null); those in *required* must be there, the
    others take the method's default when left out. *changes* says whether the
    command changes the cluster (and so is logged): True, or the name of the
    field whose presence makes it a change. *imports* says whether it may
    import task code first (up to ``PYDRA_IMPORT_TIMEOUT`` seconds,
    :mod:`pydra.importcheck`): such requests run on threads of their own
    (:data:`IMPORTING_THREADS`), so that every other request is answered
    meanwhile.
    """

    method: str
    fields: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    changes: bool | str = False
    imports: bool = False

    def changes_cluster(self, args: dict[str, Any]) -> bool:
        """Whether a request with these (valid) *args* changes the cluster."""
        if isinstance(self.changes, str):
            return args.get(self.changes) is not None
        return self.changes


#: every admin command -> its schema; requests are checked against it before anything runs
REQUESTS: dict[str, Request] = {
    "status": Request("status"),
    "workers": Request("workers"),
    "queue": Request("queue"),
    "jobs": Request("list_jobs", {"everything": "bool"}),
    "job": Request("job", {"job_id": "int"}, ("job_id",)),
    "logs": Request("logs", {"job_id": "int?", "rank": "int?", "after": "int"}),
    "submit": Request("submit", {"target": "str", "inputs": "[str]", "priority": "int"}, ("target", "inputs"), True,
                      imports=True),
    "cancel": Request("cancel", {"job_id": "int"}, ("job_id",), True),
    "priority": Request("set_priority", {"job_id": "int", "priority": "int"}, ("job_id", "priority"), True),
    "retry": Request("retry", {"job_id": "int"}, ("job_id",), True, imports=True),
    "pause": Request("pause", changes=True),
    "resume": Request("resume", changes=True),
    "drain": Request("drain", {"rank": "int"}, ("rank",), True),
    "undrain": Request("undrain", {"rank": "int"}, ("rank",), True),
    "restart": Request("restart", {"rank": "int"}, ("rank",), True),
    "config": Request("configure", {"key": "str?", "value": "str?"}, changes="value"),
    "shutdown": Request("shutdown", {"now": "bool"}, changes=True),
}

#: threads that carry out requests that import task code (more such requests wait for one)
IMPORTING_THREADS = 4

_INT64 = range(-(2**63), 2**63)  # what the journal (SQLite) can store


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


#: the types of fields: name -> (check, what the refusal says is expected)
FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # bool is an int in Python, but true is no job id or priority
    "int": (lambda value: type(value) is int and value in _INT64, "an integer (64-bit)"),
    "bool": (lambda value: type(value) is bool, "true or false"),
    "str": (_is_text, "a string with no NUL character"),
    "[str]": (lambda value: type(value) is list and all(map(_is_text, value)), "a list of strings"),
}


def validate_request(request: Any) -> tuple[str, dict[str, Any]]:
    """The command and args of *request*, checked against :data:`REQUESTS`.

    Raises :class:`ControlError` (one line) for anything else: not
    ``{"command": NAME, "args": {...}}``, an unknown command or field, a
    missing field, a value of the wrong type.
    """
    if not isinstance(request, dict) or set(request) - {"command", "args"} or "command" not in request:
        raise ControlError('a request is {"command": NAME, "args": {...}} and nothing else')
    name, args = request["command"], request.get("args", {})
    if not isinstance(name, str) or not isinstance(args, dict):
        raise ControlError('a request is {"command": NAME, "args": {...}}: NAME a string, args an object')
    schema = REQUESTS.get(name)
    if schema is None:
        raise ControlError(f"unknown command {_clip(name)}: expected one of {', '.join(sorted(REQUESTS))}")
    for key in args:
        if key not in schema.fields:
            takes = ", ".join(schema.fields) or "no fields"
            raise ControlError(f"{name}: unknown field {_clip(key)} ({name} takes {takes})")
    for key in schema.required:
        if key not in args:
            raise ControlError(f"{name}: missing field {key!r}")
    for key, value in args.items():
        kind = schema.fields[key]
        if value is None and kind.endswith("?"):
            continue
        check, expected = FIELD_TYPES[kind.rstrip("?")]
        if not check(value):
            expected += " or null" if kind.endswith("?") else ""
            raise ControlError(f"{name}: {key} must be {expected}, got {_clip(value)}")
    return name, args


def _clip(value: Any, limit: int = 60) -> str:
    """*value* as JSON, cut to *limit* characters: fit for one line of an error or a log."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def configure_logging() -> None:
    """Send the endpoint's log to stderr (rank 0's, which ``pydra serve`` shows): idempotent.

    What it logs is the audit trail of the admin endpoint: admins connecting
    or refused, every command that changes the cluster, every refused request,
    each with the admin key's fingerprint; and lines of ``authorized_keys`` it
    skips.
    """
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s pydra-control %(levelname)s %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False  # task code's logging setup on rank 0 must not swallow or double it


def connection_dir() -> Path:
    """Where running clusters leave their connection files: ``~/.pydra/run``."""
    return keys.pydra_home() / "run"


def newest_connection_file() -> Path:
    """The connection file of the newest cluster of this host that is still running.

    Strict modes: the directory must be yours and writable by you alone (else
    anyone could plant a cluster there), and so must the file be:
    :class:`~pydra.strictmodes.StrictModeError` otherwise. A file left by a
    cluster of this host that was killed (its rank 0 is gone, or its pid now
    names a process started later) is removed; one written on another host
    (a home shared over NFS) is left alone, since whether that cluster runs
    cannot be told from here.
    """
    directory = connection_dir()
    if directory.is_dir():
        strictmodes.check_directory(directory, private=True)
    files = sorted(directory.glob("*.json"), key=_modified, reverse=True)
    for path in files:
        try:
            running = _still_running(json.loads(strictmodes.read_bytes(path, strictmodes.Kind.OWN)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed meanwhile, or not a cluster's
        if running:
            return path
        if running is False:
            path.unlink(missing_ok=True)
    raise ControlError(f"no running cluster has a connection file in {connection_dir()}: start one with `pydra serve`")


def _still_running(details: dict) -> bool | None:
    """Whether the rank 0 that wrote connection file *details* still runs; None if it ran on another host."""
    if details.get("host", socket.gethostname()) != socket.gethostname():  # (no host: an older Pydra's file)
        return None
    pid, started = details["pid"], details.get("process_started")
    if type(pid) is not int:
        raise TypeError(f"a pid of {pid!r}")  # not a cluster's file: kept
    if started is not None:
        return _process_started(pid) == started
    try:  # written by an older Pydra, or where there is no /proc: the pid alone
        os.kill(pid, 0)
    except OSError:  # (EPERM too: the pid is another user's now, not this user's rank 0)
        return False
    return True


def _process_started(pid: int) -> int | None:
    """When process *pid* started (clock ticks since boot, from Linux's /proc): None if it is not there."""
    try:
        return int(proctree.stat_fields(pid)[19])  # field 22
    except (OSError, ValueError, IndexError):
        return None


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile: its cluster stopped
        return 0.0


@dataclass(frozen=True)
class Admin:
    """Who sent a request: the admin key's fingerprint and the address it came from (for the log)."""

    fingerprint: str
    address: str

    def __str__(self) -> str:
        return f"{self.fingerprint} from {self.address}"


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
        self.authorized_keys = authorized.AuthorizedKeysFile(authorized_keys, _log)
        self.identity = Ed25519PrivateKey.generate()  # this cluster's own: pinned by the connection file
        self.address: tuple[str, int] | None = None
        self.connection_file = connection_dir() / f"{cluster_id}.json"
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()  # one per connected admin
        # (every other request runs on the loop's default executor)
        self._importing = concurrent.futures.ThreadPoolExecutor(IMPORTING_THREADS, "pydra-control-import")
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
        self._importing.shutdown(wait=False, cancel_futures=True)

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
                    log=_log,
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

    def _authorize(self, public_key: bytes, address: str) -> Admin:
        admin = Admin(keys.sha256_fingerprint(public_key), address)
        try:
            line = self.authorized_keys.authorize(public_key, address, "admin")
        except authorized.AuthorizationError as refusal:
            _log.warning("refused admin %s: %s", admin, refusal)
            raise
        _log.info("admin %s connected (%s)", admin, line.location)
        return admin

    def _write_connection_file(self) -> None:
        assert self.address is not None
        details = {
            "cluster": self.cluster_id,
            "address": self.address[0],
            "port": self.address[1],
            "host_key": keys.sha256_fingerprint(self.identity.public_key()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_started": _process_started(os.getpid()),  # with the pid: this rank 0, not a later process
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
                await channel.send_json(await self._answer(request, channel.authorization))
        finally:
            self._handlers.discard(task)

    async def _answer(self, request: Any, admin: Admin) -> dict:
        """Validate *request*, then carry it out; the reply. Refusals and changes are logged."""
        try:
            # Before anything runs: a malformed request must leave the cluster exactly as it was.
            command, args = validate_request(request)
        except ControlError as exc:
            _log.warning("admin %s: refused request %s: %s", admin, _clip(request, 200), exc)
            return {"ok": False, "error": str(exc)}
        try:
            # The handlers take locks and may wait on the scheduler: keep this loop free.
            threads = self._importing if REQUESTS[command].imports else None
            result = await asyncio.get_running_loop().run_in_executor(threads, self.handle, command, args)
        except PydraError as exc:
            _log.warning("admin %s: refused %s %s: %s", admin, command, _clip(args, 200), exc)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug: say so rather than drop the admin's connection
            _log.exception("admin %s: %s %s failed", admin, command, _clip(args, 200))
            return {"ok": False, "error": f"internal error in {command}: {type(exc).__name__}: {exc}"}
        if REQUESTS[command].changes_cluster(args):
            _log.info("admin %s: %s %s", admin, command, _clip(args, 200))
        return {"ok": True, "result": result}


# -- the admin's side -----------------------------------------------------------------------


class ControlClient:
    """A blocking connection to a cluster's control endpoint (from its connection file)."""

    def __init__(self, connection_file: Path, identity: Identity, timeout: float = 30.0) -> None:
        try:
            # Strict modes: only a file of yours, in a directory only you can write, says where to connect.
            self.details = json.loads(strictmodes.read_bytes(connection_file, strictmodes.Kind.OWN))
            self.address, self.port, self.expected = (
                self.details["address"], int(self.details["port"]), self.details["host_key"]
            )
        except KeyError as exc:
            raise ControlError(f"the connection file {connection_file} has no {exc.args[0]!r}: is it a "
                               "cluster's (pydra serve writes one)?") from None
        except (OSError, ValueError, TypeError) as exc:
            raise ControlError(f"cannot read the connection file {connection_file}: {exc}") from None
        self.identity = identity
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pydra-shell-io", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()  # one request at a time on the one channel
        self._channel: Channel | None = None
        self._closing: list[concurrent.futures.Future] = []  # channels dropped, closing in the background
        self._run(self._connect())

    def call(self, command: str, **args: Any) -> Any:
        """Send one request and return its result; raise :class:`ControlError` with the cluster's reason."""
        with self._lock:
            if self._channel is None:  # the last request was given up: its reply must not answer this one
                self._run(self._connect())
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
        # Let dropped channels finish closing: a loop stopped under them prints asyncio's warnings at exit.
        concurrent.futures.wait(self._closing, timeout=2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.timeout)
        except BaseException as exc:  # (Ctrl-C included)
            future.cancel()
            self._drop_channel()  # a request given up may still be answered: the next one connects anew
            if not isinstance(exc, (OSError, ChannelError, TimeoutError, asyncio.TimeoutError)):
                raise
            reason = str(exc) or f"no answer within {self.timeout:g} s"
            raise ControlError(f"lost the connection to the cluster at {self.address}:{self.port}: {reason}") from None

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            self._closing.append(asyncio.run_coroutine_threadsafe(channel.close(), self._loop))  # not waited for here

    async def _connect(self) -> None:
        def verify_server(public_key: bytes) -> None:
            found = keys.sha256_fingerprint(public_key)
            if found != self.expected:
                raise ControlError(f"the cluster's key is {found}, but its connection file says {self.expected}")

        async def open_once() -> Channel:
            try:
                reader, writer = await asyncio.open_connection(self.address, self.port)
            except ConnectionResetError:
                raise  # refused before the handshake (a flood, say): retry_refused tries again
            except OSError as exc:
                raise ControlError(f"cannot reach the cluster at {self.address}:{self.port}: {exc.strerror or exc}") from None
            return await open_channel(reader, writer, identity=self.identity, purpose=PURPOSE, verify_server=verify_server)

        try:
            self._channel = await retry_refused(open_once)
        except Refused as exc:
            raise ControlError(f"the cluster at {self.address}:{self.port} would not talk to us: {exc}") from None
        except HandshakeTimeout as exc:  # no answer is no refusal: a cluster stopped, or swamped
            raise ControlError(f"the cluster at {self.address}:{self.port} did not answer: {exc}") from None
        except ChannelError as exc:
            raise ControlError(f"the cluster refused this key ({keys.sha256_fingerprint(self.identity.public_key())}): {exc}") from None

    async def _request(self, message: dict) -> dict:
        assert self._channel is not None
        await self._channel.send_json(message)
        return await self._channel.recv_json()
