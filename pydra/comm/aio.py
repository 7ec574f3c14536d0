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
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    Role,
    decode_json,
    encode_json,
)

__all__ = ["Channel", "ChannelClosed", "accept_channel", "open_channel", "serve_channel"]

_log = logging.getLogger(__name__)
_READ_SIZE = 64 * 1024


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

    @property
    def peer_address(self) -> str:
        """The peer's IP address ("" if the connection is already gone)."""
        peer = self._writer.get_extra_info("peername")
        return peer[0] if peer else ""

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


async def serve_channel(
    host: str,
    port: int,
    handler: Callable[[Channel], Awaitable[None]],
    *,
    identity: Ed25519PrivateKey,
    purpose: str,
    authorize_client: Callable[[bytes, str], object],
    handshake_timeout: float = 10.0,
    max_pending: int = 64,
    max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
) -> asyncio.Server:
    """Listen on `host`:`port` and call `handler(channel)` for every authenticated client.

    `authorize_client(public_key, address)` gets the client's IP address too, for
    authorized_keys lines restricted by from=; it raises to refuse the client.

    A client that has not finished the handshake within `handshake_timeout` seconds is cut
    off.  At most `max_pending` connections may be unauthenticated at once; when another
    arrives, the oldest pending one is dropped.  Dropping the oldest rather than refusing the
    newest means idle connections cannot lock legitimate clients out: an attacker has to open
    connections faster than a real client completes its two round trips.

    The channel is closed when the handler returns.  A `ChannelError` escaping the handler
    (the client vanished, say) is logged; any other exception is a bug and left to asyncio.
    """
    if max_pending < 1:
        raise ValueError("max_pending must be at least 1")
    pending: dict[asyncio.StreamWriter, None] = {}  # insertion order is age, oldest first

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")  # None if the client is already gone
        address = peer[0] if peer else ""
        if len(pending) >= max_pending:
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.transport.abort()  # its accept_channel sees end of file and gives up
        pending[writer] = None
        try:
            channel = await accept_channel(
                reader,
                writer,
                identity=identity,
                purpose=purpose,
                authorize_client=lambda key: authorize_client(key, address),
                handshake_timeout=handshake_timeout,
                max_frame_length=max_frame_length,
            )
        except ChannelError as error:
            _log.info("channel from %s refused: %s", peer, error)
            return
        finally:
            pending.pop(writer, None)
        try:
            async with channel:
                await handler(channel)
        except ChannelError as error:
            _log.info("channel from %s ended: %s", peer, error)

    return await asyncio.start_server(on_connection, host, port)


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
        event = Failed(HandshakeError(f"handshake did not finish within {timeout:g} s"))
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
