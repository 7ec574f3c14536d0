"""asyncio glue for `pydra.comm.channel`: one `Channel` per TCP connection.

A launcher (the initiator) connects and opens a channel::

    reader, writer = await asyncio.open_connection(host, port)
    channel = await open_channel(reader, writer, identity=user_key, purpose="launch",
                                 verify_server=lambda key: check_host(host, port, key))
    async with channel:
        await channel.send_json({"op": "spawn", "argv": argv})
        reply = await channel.recv_json()

A node agent (the responder) serves channels::

    async def handle(channel: Channel) -> None:
        request = await channel.recv_json()
        ...

    server = await serve_channel(
        "0.0.0.0", DEFAULT_AGENT_PORT, handle, identity=host_key, purpose="launch",
        authorize_client=lambda key, address: authorize(key, address, role="launch"),
    )
    async with server:
        await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pydra.comm.admission import Admission, Failure, Policy, QuietLog, Refusal, source_of
from pydra.comm.channel import (
    DEFAULT_MAX_FRAME_LENGTH,
    NEED_DATA,
    ChannelError,
    Closed,
    Connection,
    Data,
    Established,
    Event,
    Failed,
    HandshakeError,
    Identity,
    Refused,
    Role,
    decode_json,
    encode_json,
)
from pydra.config import setting

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelServer",
    "DEFERRED",
    "HandshakeTimeout",
    "accept_channel",
    "listener_policy",
    "open_channel",
    "retry_refused",
    "serve_channel",
]

_log = logging.getLogger(__name__)
_READ_SIZE = 64 * 1024
_BACKLOG = 1024  # a burst of connections waits in the kernel, not refused by it, while we sort them
_ACCEPT_BATCH = 256  # connections accepted in one go before the event loop runs anything else
_ACCEPT_PAUSE = 0.1  # seconds without accepting after accept() itself failed (no descriptors left)
_TARPIT_MAX = 512  # refused connections held open at most (see Tarpit)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_RETRY_PAUSE = 0.05  # seconds before the first retry of a refused connection; doubled each time


class _Deferred:
    def __repr__(self) -> str:
        return "DEFERRED"


#: What a `serve_channel` server's `authorize_client` returns for a key it cannot judge yet: the
#: client's first request decides (a system agent's names the user whose authorized_keys counts, as
#: ssh's user@host does).  Until its handler calls `Channel.authorized` the channel still counts as
#: a startup; `Channel.refused`, or the handler ending first, penalises its source as a refused key
#: (or a hang-up) would.
DEFERRED = _Deferred()


class HandshakeTimeout(HandshakeError):
    """The peer did not finish the handshake within the deadline."""


class ChannelClosed(ChannelError):
    """The peer closed the channel cleanly; `reason` is what it said."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"peer closed the channel: {reason}" if reason else "peer closed the channel"
        )
        self.reason = reason


class Channel:
    """An established channel over an asyncio stream pair.

    Get one from `open_channel`, `accept_channel` or a `serve_channel` handler.  One task may
    receive while others send.  Leaving `async with channel` closes it.
    """

    def __init__(
        self,
        connection: Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        established: Established,
    ) -> None:
        self._connection = connection
        self._reader = reader
        self._writer = writer
        self.peer_key: bytes = established.peer_key  #: the peer's raw Ed25519 public key
        self.authorization: object = established.authorization  #: what the peer check returned
        self._verdict: Callable[[bool], None] | None = None  # a deferred client check's (see DEFERRED)

    @property
    def peer_address(self) -> str:
        """The peer's IP address ("" if the connection is already gone)."""
        peer = self._writer.get_extra_info("peername")
        return peer[0] if peer else ""

    def authorized(self) -> None:
        """The handler allows the client whose check was `DEFERRED`: it is a startup no more (else nothing)."""
        self._give_verdict(True)

    def refused(self) -> None:
        """The handler refuses the client whose check was `DEFERRED`: its source is penalised (else nothing)."""
        self._give_verdict(False)

    def _give_verdict(self, allowed: bool) -> None:
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            verdict(allowed)

    async def send(self, data: bytes) -> None:
        """Send application bytes."""
        await _write(self._writer, self._connection.send(Data(data)))

    async def send_json(self, message: dict[str, Any]) -> None:
        """Send a JSON object."""
        await self.send(encode_json(message))

    async def recv(self) -> bytes:
        """Receive application bytes; raise `ChannelClosed` at a clean close, or the failure."""
        event = await _next_event(self._connection, self._reader, self._writer)
        if isinstance(event, Data):
            return event.data
        if isinstance(event, Closed):
            raise ChannelClosed(event.reason)
        assert isinstance(event, Failed)  # Established comes only once, before this object exists
        raise event.error

    async def recv_json(self) -> dict[str, Any]:
        """Receive a JSON object."""
        return decode_json(await self.recv())

    async def close(self, reason: str = "") -> None:
        """Send the close frame (if still possible) and close the stream."""
        try:
            if self._connection.can_send:
                await _write(self._writer, self._connection.send(Closed(reason)))
        finally:
            await _close(self._writer)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # The peer sees why: a plain close, or one that says this side gave up.
        await self.close("" if exc_type is None else "error")


async def open_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    identity: Identity,
    purpose: str,
    verify_server: Callable[[bytes], None],
    handshake_timeout: float = 10.0,
    max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
) -> Channel:
    """Run the initiator's side of the handshake on a connected stream.

    `verify_server(public_key)` raises to reject the server's Ed25519 key; our identity is
    sent only after it returns.  The channel owns the stream from now on: on failure it is
    closed and the `ChannelError` raised.
    """
    connection = Connection(
        Role.INITIATOR, identity, purpose, verify_server, max_frame_length=max_frame_length
    )
    return await _establish(connection, reader, writer, handshake_timeout)


async def accept_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    identity: Ed25519PrivateKey,
    purpose: str,
    authorize_client: Callable[[bytes], object],
    handshake_timeout: float = 10.0,
    max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
) -> Channel:
    """Run the responder's side of the handshake on an accepted stream.

    `authorize_client(public_key)` raises to refuse the client; what it returns becomes
    `Channel.authorization`.  On failure the stream is closed and the `ChannelError` raised.
    """
    connection = Connection(
        Role.RESPONDER, identity, purpose, authorize_client, max_frame_length=max_frame_length
    )
    return await _establish(connection, reader, writer, handshake_timeout)


def listener_policy() -> Policy:
    """The flood defences the ``PYDRA_MAX_STARTUPS`` ... ``PYDRA_LOGIN_GRACE_TIME`` settings describe."""
    return Policy(
        setting("MAX_STARTUPS"), setting("PER_SOURCE_MAX_STARTUPS"),
        setting("PER_SOURCE_PENALTIES"), setting("LOGIN_GRACE_TIME"),
    )


class Tarpit:
    """Refused connections held open, unread, for *hold* seconds, then reset.

    A reconnecting flooder whose refused connection is closed at once opens the next one at
    once, as fast as its CPU allows, and ours goes on refusing them.  Held, the connection costs
    a descriptor and a small receive buffer, no task and no crypto; the flooder waits.  At most
    `capacity` are held (a quarter of the descriptors this process may open, up to 512); beyond,
    a refused connection is reset at once.
    """

    def __init__(self, hold: float) -> None:
        self.hold_seconds = hold
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.capacity = min(_TARPIT_MAX, soft // 4) if soft != resource.RLIM_INFINITY else _TARPIT_MAX
        self._held: collections.deque[tuple[float, socket.socket]] = collections.deque()  # oldest first
        self._sweep: asyncio.TimerHandle | None = None

    def hold(self, sock: socket.socket) -> bool:
        """Hold *sock* (True), or False if the tarpit is full."""
        if len(self._held) >= self.capacity:
            return False
        with contextlib.suppress(OSError):  # a small window: what the flooder sends costs little memory
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        loop = asyncio.get_running_loop()
        self._held.append((loop.time() + self.hold_seconds, sock))
        if self._sweep is None:
            self._sweep = loop.call_later(self.hold_seconds, self._release_due)
        return True

    def close(self) -> None:
        """Reset every held connection."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._held:
            _reset(self._held.popleft()[1])

    def _release_due(self) -> None:
        loop = asyncio.get_running_loop()
        while self._held and self._held[0][0] <= loop.time():
            _reset(self._held.popleft()[1])
        self._sweep = loop.call_at(self._held[0][0], self._release_due) if self._held else None


def _reset(sock: socket.socket) -> None:
    # A reset rather than a close: no TIME_WAIT left behind for each refused connection.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    sock.close()


class ChannelServer:
    """A listening socket that admits connections before any crypto and serves their channels.

    Every connection is accepted by our own loop (not asyncio's, which would make a transport and
    a task for each), so a refused one costs an ``accept``, a dictionary look-up and a close:
    :class:`~pydra.comm.admission.Admission` decides, from the source address alone.  An admitted
    one has `Policy.grace` seconds to authenticate; the moment its key is authorized it stops
    counting as a startup, so an accepted channel is never dropped to make room (a key whose check
    is `DEFERRED` to its first request: the moment its handler says `Channel.authorized`).

    Use it as `asyncio.Server` is used: ``async with server: await server.serve_forever()``.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Callable[[Channel], Awaitable[None]],
        *,
        identity: Ed25519PrivateKey,
        purpose: str,
        authorize_client: Callable[[bytes, str], object],
        policy: Policy,
        max_frame_length: int,
        log: logging.Logger,
    ) -> None:
        self.sockets = [sock]
        self._sock = sock
        self._handler = handler
        self._identity = identity
        self._purpose = purpose
        self._authorize_client = authorize_client
        self._max_frame_length = max_frame_length
        self.admission = Admission(policy)
        self._tarpit = Tarpit(policy.grace)
        self._quiet = QuietLog(log)
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._startups: set[asyncio.Task] = set()  # handshakes under way
        self._channels: set[asyncio.Task] = set()  # established channels being served
        self._flush: asyncio.TimerHandle | None = None
        self._closed = self._loop.create_future()
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening and abandon the handshakes under way; established channels carry on."""
        if self._closed.done():
            return
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in self._startups:
            task.cancel()
        self._tarpit.close()
        if self._flush is not None:
            self._flush.cancel()
        self._quiet.flush()
        self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until `close` has been called."""
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        """Serve until closed or cancelled (cancelling closes)."""
        try:
            await self.wait_closed()
        finally:
            self.close()

    async def __aenter__(self) -> ChannelServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):  # then let the established channels have a turn
            try:
                sock, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, say: pause rather than spin on it
                self._note(logging.WARNING, "accept failed", "accept failed: %s", error)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_ACCEPT_PAUSE, self._resume)
                return
            address = peer[0] if isinstance(peer, tuple) else ""
            source = source_of(address)
            refusal = self.admission.admit(source)
            if refusal is not None:
                # A flooder's connections are held, unread, rather than closed: closed, each would
                # be back at once.  One dropped at random is closed at once: it may be a client's.
                if refusal is Refusal.STARTUPS or not self._tarpit.hold(sock):
                    _reset(sock)
                self._note(logging.INFO, refusal.value, "refused a connection from %s: %s", address, refusal.value)
                continue
            task = self._loop.create_task(self._startup(sock, address, source))
            self._startups.add(task)
            task.add_done_callback(self._startups.discard)

    def _resume(self) -> None:
        if not self._closed.done():
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _startup(self, sock: socket.socket, address: str, source: str) -> None:
        failure = Failure.NOAUTH
        authenticated = False

        def authorize(key: bytes) -> object:
            nonlocal failure, authenticated
            try:
                result = self._authorize_client(key, address)
            except Exception:
                failure = Failure.AUTHFAIL
                raise
            # From this moment the connection is a client's, not a startup: nothing may evict it
            # (a deferred one: from its handler's verdict on).
            if result is not DEFERRED:
                authenticated = True
                self.admission.authenticated(source)
            return result

        try:
            reader, writer = await asyncio.open_connection(sock=sock)  # on failure, it closes sock
            channel = await accept_channel(  # on failure, it closes the stream
                reader, writer, identity=self._identity, purpose=self._purpose, authorize_client=authorize,
                handshake_timeout=self.admission.policy.grace, max_frame_length=self._max_frame_length,
            )
        except asyncio.CancelledError:  # the server is closing: no fault of the client's
            if not authenticated:
                self.admission.release(source)
            raise
        except (ChannelError, OSError) as error:
            if isinstance(error, HandshakeTimeout):
                failure = Failure.GRACE
            self._note(logging.INFO, "handshake failed", "channel from %s refused: %s", address, error)
            if not authenticated:
                self._penalise(source, failure)
            return
        task = asyncio.current_task()
        self._startups.discard(task)  # an established channel outlives close()
        self._channels.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._channels.discard)
        if channel.authorization is DEFERRED:
            channel._verdict = functools.partial(self._verdict, source)
        try:
            async with channel:
                await self._handler(channel)
        except ChannelError as error:
            self._log.info("channel from %s ended: %s", address, error)
        except asyncio.CancelledError:  # the loop is ending: no fault of the client's
            if channel._verdict is not None:
                channel._verdict = None
                self.admission.release(source)
            raise
        finally:
            if channel._verdict is not None:  # it hung up, or sent nothing it could be judged by, in time
                channel._verdict = None
                self._penalise(source, Failure.NOAUTH)

    def _verdict(self, source: str, allowed: bool) -> None:
        """The handler's verdict on a client whose check was deferred to its request."""
        if allowed:
            self.admission.authenticated(source)
        else:
            self._penalise(source, Failure.AUTHFAIL)

    def _penalise(self, source: str, failure: Failure) -> None:
        seconds = self.admission.failed(source, failure)
        if seconds is not None:
            self._note(logging.WARNING, "penalty started",
                       "refusing %s for %.0f s: its handshakes keep failing (last: %s)", source, seconds, failure.value)

    def _note(self, level: int, kind: str, message: str, *args: object) -> None:
        self._quiet.note(level, kind, message, *args)
        due = self._quiet.flush_due
        if due is not None and self._flush is None:
            self._flush = self._loop.call_later(max(0.0, due - time.monotonic()), self._flush_log)

    def _flush_log(self) -> None:
        self._flush = None
        self._quiet.tick()
        due = self._quiet.flush_due
        if due is not None:  # suppressed since the interval began anew: report that at its end
            self._flush = self._loop.call_later(max(0.0, due - time.monotonic()), self._flush_log)


async def serve_channel(
    host: str,
    port: int,
    handler: Callable[[Channel], Awaitable[None]],
    *,
    identity: Ed25519PrivateKey,
    purpose: str,
    authorize_client: Callable[[bytes, str], object],
    policy: Policy | None = None,
    max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
    log: logging.Logger = _log,
) -> ChannelServer:
    """Listen on `host`:`port` and call `handler(channel)` for every authenticated client.

    `authorize_client(public_key, address)` gets the client's IP address too, for
    authorized_keys lines restricted by from=; it raises to refuse the client.

    `policy` (default: `listener_policy()`, from the settings) says which connections are refused
    before their handshake and how long a handshake may take (see `pydra.comm.admission`).
    Refusals and failed handshakes go to `log`, a few lines per interval and then a count.

    The channel is closed when the handler returns.  A `ChannelError` escaping the handler
    (the client vanished, say) is logged; any other exception is a bug and left to asyncio.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return ChannelServer(
        sock, handler, identity=identity, purpose=purpose, authorize_client=authorize_client,
        policy=policy or listener_policy(), max_frame_length=max_frame_length, log=log,
    )


async def retry_refused(open_once: Callable[[], Awaitable[Channel]], attempts: int = 6,
                        on_retry: Callable[[BaseException], None] | None = None) -> Channel:
    """``await open_once()``, tried again after a growing random pause while the server refuses it.

    A listener under a flood drops some new connections at random before their handshake
    (MaxStartups); a legitimate client that tries again a few times gets through.  Refused means
    closed before the handshake: `Refused`, or a reset that came before connect() even returned.
    Any other failure, and the last refusal (as `Refused`), is raised.  *on_retry* is called with
    each refusal that is tried again (a penalised source's take seconds each: the caller may say so).
    """
    for attempt in range(attempts):
        try:
            return await open_once()
        except (Refused, ConnectionResetError) as error:  # reset: refused before connect() returned
            if attempt == attempts - 1:
                raise Refused(str(error)) if isinstance(error, ConnectionResetError) else error
            if on_retry is not None:
                on_retry(error)
            await asyncio.sleep(random.uniform(0.5, 1.0) * _RETRY_PAUSE * 2**attempt)
    raise AssertionError("unreachable")


async def _establish(
    connection: Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    timeout: float,
) -> Channel:
    try:
        # The first event is always Established or Failed.
        event = await asyncio.wait_for(_next_event(connection, reader, writer), timeout)
    except asyncio.TimeoutError:
        event = Failed(HandshakeTimeout(f"handshake did not finish within {timeout:g} s"))
    except BaseException:
        writer.close()
        raise
    if isinstance(event, Failed):
        writer.close()
        raise event.error
    assert isinstance(event, Established)
    return Channel(connection, reader, writer, event)


async def _next_event(
    connection: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Event:
    while True:
        event = connection.next_event()
        # Processing may have queued handshake replies, proofs or a refusal.
        await _write(writer, connection.data_to_send())
        if event is not NEED_DATA:
            return event
        try:
            data = await reader.read(_READ_SIZE)
        except ConnectionError:
            data = b""  # a reset is an end of file; the state machine judges whether it's clean
        connection.receive_data(data)


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not data:
        return
    writer.write(data)
    try:
        await writer.drain()
    except ConnectionError as error:
        raise ChannelError(f"connection lost while sending: {error}") from error


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):  # the peer went first: closed either way
        await writer.wait_closed()
