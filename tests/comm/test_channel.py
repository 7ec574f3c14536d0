"""Tests for pydra.comm.channel (in memory) and pydra.comm.aio (over 127.0.0.1)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from pydra.comm.admission import Penalties, Policy, Startups
from pydra.comm.aio import DEFERRED, ChannelClosed, open_channel, retry_refused, serve_channel
from pydra.comm.channel import (
    NEED_DATA,
    AuthenticationError,
    ChannelError,
    Closed,
    Connection,
    Data,
    Established,
    Event,
    Failed,
    HandshakeError,
    ProtocolError,
    Refused,
    Role,
    State,
    UsageError,
    decode_json,
    encode_json,
)
from pydra.comm.noise import MAX_NONCE

CLIENT_KEY = Ed25519PrivateKey.generate()
SERVER_KEY = Ed25519PrivateKey.generate()
MALLORY_KEY = Ed25519PrivateKey.generate()


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def pin(expected: Ed25519PrivateKey) -> Callable[[bytes], None]:
    """A verify_server that knows one host key, like a known_hosts line."""

    def verify(key: bytes) -> None:
        if key != raw(expected):
            raise PermissionError("unknown host key")

    return verify


class Authorizer:
    """An authorize_client that accepts one key as user "alice" and records every call."""

    def __init__(self, allowed: Ed25519PrivateKey = CLIENT_KEY) -> None:
        self.allowed = raw(allowed)
        self.calls: list[bytes] = []
        self.addresses: list[str] = []  # only serve_channel passes the client's address

    def __call__(self, key: bytes, *address: str) -> str:
        self.calls.append(key)
        self.addresses += address
        if key != self.allowed:
            raise PermissionError("not in authorized_keys")
        return "alice"


def client(
    purpose: str = "launch",
    verify: Callable[[bytes], object] | None = None,
    identity=CLIENT_KEY,
    **options,
) -> Connection:
    return Connection(Role.INITIATOR, identity, purpose, verify or pin(SERVER_KEY), **options)


def server(
    purpose: str = "launch",
    authorize: Callable[[bytes], object] | None = None,
    identity=SERVER_KEY,
    **options,
) -> Connection:
    return Connection(Role.RESPONDER, identity, purpose, authorize or Authorizer(), **options)


def drain(connection: Connection) -> list[Event]:
    """Every event available now; stops at a terminal event, which repeats forever."""
    events: list[Event] = []
    for _ in range(10_000):  # a bound, so a state machine that loops fails instead of hanging
        event = connection.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, (Closed, Failed)):
            assert connection.next_event() is event
            return events
    raise AssertionError("next_event never asked for data")


def converse(initiator: Connection, responder: Connection, tamper=None):
    """Carry bytes back and forth until both sides are quiet.

    Each flight (what one side emits in one go) passes through tamper(index, data) first.
    Returns (initiator events, responder events, flights as delivered).
    """
    events = {initiator: [], responder: []}
    flights: list[bytes] = []
    sender, receiver = initiator, responder
    data = initiator.data_to_send()
    while data:
        if tamper is not None:
            data = tamper(len(flights), data)
        flights.append(data)
        receiver.receive_data(data)
        events[receiver] += drain(receiver)
        sender, receiver = receiver, sender
        data = sender.data_to_send()
    return events[initiator], events[responder], flights


def hang_up(connection: Connection) -> list[Event]:
    connection.receive_data(b"")
    return drain(connection)


def open_pair(**options) -> tuple[Connection, Connection]:
    initiator, responder = client(**options), server(**options)
    initiator_events, responder_events, _ = converse(initiator, responder)
    assert [type(event) for event in initiator_events] == [Established]
    assert [type(event) for event in responder_events] == [Established]
    return initiator, responder


def failure(events: list[Event]) -> Exception:
    assert events and isinstance(events[-1], Failed), events
    return events[-1].error


# -- the handshake --------------------------------------------------------------------------


def test_happy_path_both_directions():
    authorizer = Authorizer()
    initiator, responder = client(), server(authorize=authorizer)
    initiator_events, responder_events, flights = converse(initiator, responder)

    assert initiator_events == [Established(raw(SERVER_KEY), None)]
    assert responder_events == [Established(raw(CLIENT_KEY), "alice")]
    assert authorizer.calls == [raw(CLIENT_KEY)]
    # msg1 | msg2 + responder AUTH | initiator AUTH | ACCEPT
    assert [len(flight) for flight in flights] == [36, 52 + 117, 117, 21]

    responder.receive_data(initiator.send(Data(b"to server")) + initiator.send(Data(b"")))
    assert drain(responder) == [Data(b"to server"), Data(b"")]
    initiator.receive_data(responder.send(Data(encode_json({"rank": 3, "argv": ["a", "é"]}))))
    [event] = drain(initiator)
    assert decode_json(event.data) == {"rank": 3, "argv": ["a", "é"]}

    responder.receive_data(initiator.send(Closed("done")))
    assert drain(responder) == [Closed("done")]
    assert responder.state is State.CLOSED and not initiator.can_send
    initiator.receive_data(responder.send(Closed()))
    assert drain(initiator) == [Closed("")]
    assert hang_up(initiator) == [Closed("")]  # end of file after a close frame is clean
    assert hang_up(responder) == [Closed("done")]


def test_any_split_of_the_byte_stream_works():
    initiator, responder = client(), server()
    events = {initiator: [], responder: []}
    sender, receiver = initiator, responder
    while data := sender.data_to_send():
        for i in range(len(data)):  # one byte at a time
            receiver.receive_data(data[i : i + 1])
            events[receiver] += drain(receiver)
        sender, receiver = receiver, sender
    assert [type(event) for event in events[initiator]] == [Established]
    assert [type(event) for event in events[responder]] == [Established]


def test_wrong_purpose_fails():
    initiator, responder = client("launch"), server("admin")
    initiator_events, responder_events, _ = converse(initiator, responder)
    error = failure(initiator_events)
    assert isinstance(error, HandshakeError)
    assert str(error) == "handshake message 2 failed to decrypt"
    assert responder_events == []
    assert str(failure(hang_up(responder))) == "connection ended before the channel was established"


def test_rejected_server_learns_nothing_about_the_client():
    authorizer = Authorizer()
    initiator, responder = client(verify=pin(MALLORY_KEY)), server(authorize=authorizer)
    initiator_events, responder_events, flights = converse(initiator, responder)

    error = failure(initiator_events)
    assert isinstance(error, AuthenticationError)
    assert str(error) == "responder identity rejected: unknown host key"
    # The client emitted only its ephemeral key: no identity, not even encrypted.
    client_bytes = b"".join(flights[0::2])
    assert len(client_bytes) == 36
    assert raw(CLIENT_KEY) not in client_bytes
    assert responder_events == [] and authorizer.calls == []
    assert isinstance(failure(hang_up(responder)), ProtocolError)


def test_unauthorized_client_is_refused():
    authorizer = Authorizer(allowed=MALLORY_KEY)
    initiator, responder = client(), server(authorize=authorizer)
    initiator_events, responder_events, _ = converse(initiator, responder)

    error = failure(responder_events)
    assert isinstance(error, AuthenticationError)
    assert str(error) == "initiator identity rejected: not in authorized_keys"
    error = failure(initiator_events)
    assert isinstance(error, AuthenticationError)
    assert str(error) == "responder refused the channel: client not authorized"
    assert authorizer.calls == [raw(CLIENT_KEY)]


def test_replayed_initiator_fails_with_a_new_responder():
    _, _, flights = converse(client(), server())
    authorizer = Authorizer()
    responder = server(authorize=authorizer)
    events = []
    for flight in flights[0::2]:  # msg1, then the initiator's AUTH frame
        responder.receive_data(flight)
        events += drain(responder)
    assert str(failure(events)) == "frame 0 failed to decrypt"
    assert authorizer.calls == []


def test_replayed_responder_fails_with_a_new_initiator():
    _, _, flights = converse(client(), server())
    initiator = client()
    initiator.receive_data(flights[1])
    assert str(failure(drain(initiator))) == "handshake message 2 failed to decrypt"


@pytest.mark.parametrize("attack", ["replay", "reorder", "reflect"])
def test_transport_frames_cannot_be_replayed_reordered_or_reflected(attack):
    initiator, responder = open_pair()
    first, second = initiator.send(Data(b"first")), initiator.send(Data(b"second"))
    victim, data = {
        "replay": (responder, first + first),
        "reorder": (responder, second + first),
        "reflect": (initiator, first),
    }[attack]
    victim.receive_data(data)
    events = drain(victim)
    assert not any(isinstance(event, Data) and event.data == b"second" for event in events)
    error = failure(events)
    assert isinstance(error, ProtocolError) and str(error).endswith("failed to decrypt")


def _flip(flight: int, bit: int):
    def tamper(index: int, data: bytes) -> bytes:
        if index != flight:
            return data
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)

    return tamper


def test_every_single_bit_flip_in_the_handshake_is_rejected():
    _, _, flights = converse(client(), server())
    for flight, data in enumerate(flights):
        for bit in range(len(data) * 8):
            initiator, responder = client(), server()
            initiator_events, responder_events, _ = converse(
                initiator, responder, _flip(flight, bit)
            )
            initiator_events += hang_up(initiator)
            responder_events += hang_up(responder)
            # The last flight is ACCEPT: the responder has rightly accepted before it.
            assert flight == 3 or not any(isinstance(e, Established) for e in responder_events)
            assert not any(isinstance(e, Established) for e in initiator_events), (flight, bit)
            assert isinstance(failure(initiator_events), ChannelError)


# -- framing limits and truncation ----------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 120])
def test_end_of_file_mid_frame_is_an_error(cut):
    initiator, responder = open_pair()
    frame = initiator.send(Data(bytes(100)))
    assert len(frame) == 121
    responder.receive_data(frame[:cut])
    assert drain(responder) == []
    assert str(failure(hang_up(responder))) == "connection ended mid-frame"


def test_end_of_file_without_close_frame_is_an_error():
    initiator, responder = open_pair()
    responder.receive_data(initiator.send(Data(b"last words")))
    assert drain(responder) == [Data(b"last words")]
    assert str(failure(hang_up(responder))) == "connection ended without a close frame"


def test_oversized_length_prefix_is_rejected_without_allocating():
    _, responder = open_pair()
    tracemalloc.start()
    responder.receive_data(b"\x80\x00\x00\x00")
    events = drain(responder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(failure(events)) == "frame length 2147483648 exceeds limit 1048576"
    assert peak < 64 * 1024


def test_frames_before_authentication_are_small():
    responder = server()
    responder.receive_data((257).to_bytes(4, "big"))
    assert str(failure(drain(responder))) == "frame length 257 exceeds limit 256"


def test_max_frame_length_is_configurable():
    initiator, responder = open_pair(max_frame_length=1000)
    responder.receive_data(initiator.send(Data(bytes(1000 - 17))))
    assert drain(responder) == [Data(bytes(983))]
    with pytest.raises(UsageError, match="frame length 1001 exceeds limit 1000"):
        initiator.send(Data(bytes(984)))
    responder.receive_data((1001).to_bytes(4, "big"))
    assert str(failure(drain(responder))) == "frame length 1001 exceeds limit 1000"


def test_counters_never_wrap():
    initiator, responder = open_pair()
    initiator._send_cipher.set_nonce(MAX_NONCE - 1)
    responder._receive_cipher.set_nonce(MAX_NONCE - 1)
    responder.receive_data(initiator.send(Data(b"last")))
    assert drain(responder) == [Data(b"last")]
    with pytest.raises(ProtocolError, match="reserved"):
        initiator.send(Data(b"one too many"))
    assert initiator.state is State.ERROR


# -- misuse and helpers ---------------------------------------------------------------------


def test_usage_errors_end_the_connection():
    initiator = client()
    with pytest.raises(UsageError, match="cannot send in state handshake"):
        initiator.send(Data(b"too early"))
    assert initiator.state is State.ERROR
    assert isinstance(failure(drain(initiator)), UsageError)

    initiator, _ = open_pair()
    with pytest.raises(UsageError, match="cannot send Established events"):
        initiator.send(Established(b""))

    initiator, _ = open_pair()
    initiator.send(Closed())
    with pytest.raises(UsageError, match="cannot send after close"):
        initiator.send(Data(b"too late"))

    with pytest.raises(ValueError, match="purpose"):
        client(purpose="Launch Now")


def test_failure_is_terminal():
    _, responder = open_pair()
    responder.receive_data(b"\x00\x00\x00\x11" + bytes(17))
    [event] = drain(responder)
    responder.receive_data(b"more bytes")
    assert responder.next_event() is event
    assert responder.state is State.ERROR and not responder.can_send


def test_json_helpers_accept_only_json_objects():
    assert decode_json(encode_json({"a": [1, 2.5, None, "x"]})) == {"a": [1, 2.5, None, "x"]}
    for data in [b"[1]", b"NaN", b'{"a": NaN}', b"\xff", b"{", b"[" * 100_000]:
        with pytest.raises(ProtocolError):
            decode_json(data)
    with pytest.raises(ValueError):
        encode_json({"a": float("nan")})
    with pytest.raises(TypeError):
        encode_json([1])


# -- active attackers -----------------------------------------------------------------------


def test_man_in_the_middle_with_its_own_key_fails():
    # Mallory terminates the client's channel and opens her own to the server.
    authorizer = Authorizer()
    initiator = client(verify=pin(SERVER_KEY))
    towards_client = server(identity=MALLORY_KEY, authorize=lambda key: None)
    initiator_events, _, _ = converse(initiator, towards_client)
    assert str(failure(initiator_events)) == "responder identity rejected: unknown host key"

    # Even a client that trusts any host key gives her nothing she can use with the server.
    trusting = client(verify=lambda key: None)
    towards_client = server(identity=MALLORY_KEY, authorize=lambda key: None)
    initiator_events, mallory_events, _ = converse(trusting, towards_client)
    assert isinstance(initiator_events[0], Established)
    assert isinstance(mallory_events[0], Established)
    towards_server = client(identity=MALLORY_KEY, verify=pin(SERVER_KEY))
    _, server_events, _ = converse(towards_server, server(authorize=authorizer))
    assert isinstance(failure(server_events), AuthenticationError)
    assert authorizer.calls == [raw(MALLORY_KEY)]


chunks = st.lists(
    st.one_of(
        st.binary(max_size=64),
        # well-framed garbage gets past the length check to the crypto
        st.binary(max_size=200).map(lambda body: len(body).to_bytes(4, "big") + body),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(role=st.sampled_from(["responder", "initiator", "open"]), data=chunks)
def test_random_bytes_only_ever_fail(role, data):
    connection = {"responder": server, "initiator": client, "open": lambda: open_pair()[1]}[role]()
    events = []
    for chunk in data:
        connection.receive_data(chunk)
        events += drain(connection)
    events += hang_up(connection)
    assert all(isinstance(event, Failed) for event in events)
    assert isinstance(failure(events), ChannelError)
    assert connection.state is State.ERROR


# -- asyncio over 127.0.0.1 -----------------------------------------------------------------


async def _serve(handler=None, **options):
    async def echo(channel):
        try:
            while True:
                message = await channel.recv_json()
                await channel.send_json({"echo": message, "user": channel.authorization})
        except ChannelClosed:
            pass

    options.setdefault("authorize_client", Authorizer())
    server = await serve_channel(
        "127.0.0.1", 0, handler or echo, identity=SERVER_KEY, purpose="launch", **options
    )
    return server, server.sockets[0].getsockname()[1]


async def _connect(port, identity=CLIENT_KEY, local=None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local and (local, 0))
    return await open_channel(
        reader, writer, identity=identity, purpose="launch", verify_server=pin(SERVER_KEY)
    )


def test_asyncio_round_trip():
    async def main():
        authorizer = Authorizer()
        server, port = await _serve(authorize_client=authorizer)
        async with server, await _connect(port) as channel:
            assert channel.peer_key == raw(SERVER_KEY)
            assert authorizer.addresses == ["127.0.0.1"]
            await channel.send_json({"op": "spawn", "n": 4})
            assert await channel.recv_json() == {
                "echo": {"op": "spawn", "n": 4},
                "user": "alice",
            }
            await channel.send(b"\x00 not json")
            with pytest.raises(ChannelClosed) as closed:
                await channel.recv_json()  # the echo handler failed to parse it and gave up
            assert closed.value.reason == "error"

    asyncio.run(main())


def test_asyncio_unauthorized_client_is_told_why():
    async def main():
        server, port = await _serve()
        async with server:
            with pytest.raises(
                AuthenticationError, match="refused the channel: client not authorized"
            ):
                await _connect(port, identity=MALLORY_KEY)

    asyncio.run(main())


def test_asyncio_client_gives_up_on_a_silent_server():
    async def main():
        accepted = []
        silent = await asyncio.start_server(
            lambda reader, writer: accepted.append(writer), "127.0.0.1", 0
        )
        async with silent:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", silent.sockets[0].getsockname()[1]
            )
            with pytest.raises(HandshakeError, match=r"did not finish within 0\.2 s"):
                await open_channel(
                    reader,
                    writer,
                    identity=CLIENT_KEY,
                    purpose="launch",
                    verify_server=pin(SERVER_KEY),
                    handshake_timeout=0.2,
                )
            for server_side in accepted:
                server_side.close()

    asyncio.run(main())


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), seconds) == b""
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True


def test_slowloris_is_cut_at_the_handshake_deadline():
    async def main():
        server, port = await _serve(policy=Policy(grace=0.3))
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            message = (32).to_bytes(4, "big") + bytes(range(32))  # a plausible first message
            closed = asyncio.ensure_future(_closed_within(reader, 60.0))
            sent = 0
            for byte in message:  # one byte every 0.2 s: the whole message would take 6.4 s
                if closed.done():
                    break
                writer.write(bytes([byte]))
                sent += 1
                await asyncio.sleep(0.2)
            assert await closed
            assert sent < len(message)  # cut while still dripping, however loaded the machine
            assert time.monotonic() - started > 0.25  # not before the deadline
            writer.close()

    asyncio.run(main())


async def _flood(port, count, source=lambda n: "127.0.0.1"):
    """*count* idle connections; how many the server closed at once, and the writers of the others."""
    streams, refused = [], 0
    for n in range(count):
        try:
            streams.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(source(n), 0)))
        except ConnectionResetError:  # the refusal came before connect() returned
            refused += 1
    closed = await asyncio.gather(*(_closed_within(reader, 0.5) for reader, _ in streams))
    return refused + sum(closed), [writer for writer, gone in zip((w for _, w in streams), closed) if not gone]


def test_one_source_gets_only_its_share_of_the_startups_and_its_excess_is_held_unread():
    async def main():
        server, port = await _serve(policy=Policy(per_source=4, grace=1.0))
        async with server:
            streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
            await asyncio.sleep(0.2)
            assert server.admission.pending == 4  # 6 refused: held open, unread, so they do not reconnect
            closed = await asyncio.gather(*(_closed_within(reader, 0.3) for reader, _ in streams))
            assert not any(closed)

            with pytest.raises((Refused, ConnectionResetError)):
                await _connect(port)  # 127.0.0.1 has used up its share, even for a real client
            async with await _connect(port, local="127.0.0.2") as channel:  # another host has not
                await channel.send_json({"hello": 1})
                assert (await channel.recv_json())["echo"] == {"hello": 1}
            closed = await asyncio.gather(*(_closed_within(reader, 3.0) for reader, _ in streams))
            assert all(closed)  # the held ones after the grace time, the pending ones at it
            for _, writer in streams:
                writer.close()

    asyncio.run(main())


def test_an_accepted_channel_is_never_evicted_by_a_flood():
    async def main():
        server, port = await _serve(policy=Policy(startups=Startups.parse("3")))  # 3 startups at most
        async with server:
            channel = await _connect(port, local="127.0.0.2")
            assert server.admission.pending == 0  # it stopped counting the moment its key was authorized
            # from 10 addresses, so no per-source limit is reached: up to "full", then refused
            refused, flood = await _flood(port, 30, lambda n: f"127.0.1.{n % 10}")
            assert refused == 27 and server.admission.pending == 3
            async with channel:
                await channel.send_json({"still": "here"})
                assert (await channel.recv_json())["echo"] == {"still": "here"}
            for writer in flood:
                writer.close()

    asyncio.run(main())


def test_a_deferred_client_is_a_startup_until_its_handler_judges_it_and_a_refusal_is_penalised():
    """As sshd's userauth: a key its first request must vouch for (DEFERRED) holds a startup until then.

    From 127.0.0.2 the handler allows the client, from .3 refuses it, from .4 gives no verdict
    (the client hung up, or its request never came): a refusal earns its source an ``authfail``
    penalty, silence a ``noauth`` one (here each enough for the source to be refused before its
    handshake from then on), a verdict of allowed none.
    """
    judged = []

    async def judge(channel):
        pending_before = server.admission.pending
        verdict = {"127.0.0.2": channel.authorized, "127.0.0.3": channel.refused}.get(channel.peer_address)
        if verdict is not None:
            verdict()
            (channel.authorized if verdict == channel.refused else channel.refused)()  # changes nothing
        judged.append(channel.peer_address)
        await channel.send_json({"before": pending_before, "after": server.admission.pending})

    async def main():
        nonlocal server
        penalties = Penalties(authfail=15, noauth=15, grace=10, min=15, max=600)
        server, port = await _serve(handler=judge, authorize_client=lambda key, address: DEFERRED,
                                    policy=Policy(penalties=penalties))
        async with server:
            for _ in range(4):  # allowed: never penalised
                async with await _connect(port, local="127.0.0.2") as channel:
                    assert await channel.recv_json() == {"before": 1, "after": 0}
            async with await _connect(port, local="127.0.0.3") as channel:  # refused: a startup no more
                assert await channel.recv_json() == {"before": 1, "after": 0}
            async with await _connect(port, local="127.0.0.4") as channel:  # no verdict
                assert await channel.recv_json() == {"before": 1, "after": 1}
            for _ in range(200):  # the handlers' ends are the server's to see: wait for the last one
                if server.admission.penalised("127.0.0.4"):
                    break
                await asyncio.sleep(0.05)
            assert server.admission.pending == 0
            assert server.admission.penalised("127.0.0.2") == 0
            assert server.admission.penalised("127.0.0.3") > 0 and server.admission.penalised("127.0.0.4") > 0
            for source in ("127.0.0.3", "127.0.0.4"):
                with pytest.raises((Refused, ConnectionResetError, asyncio.TimeoutError)):
                    await asyncio.wait_for(_connect(port, local=source), 2.0)  # held unread, or reset
            async with await _connect(port, local="127.0.0.2") as channel:
                assert (await channel.recv_json())["after"] == 0
            assert judged.count("127.0.0.3") == 1 and judged.count("127.0.0.4") == 1

    server = None
    asyncio.run(main())


def test_a_client_tries_again_when_dropped_at_random():
    async def main():
        server, port = await _serve(policy=Policy(startups=Startups(1, 50, 100)))
        async with server:
            idle = await asyncio.open_connection("127.0.0.1", port)  # one pending: half of new ones dropped
            await asyncio.sleep(0.1)
            attempts = []

            async def open_once():
                attempts.append(1)
                return await _connect(port, local="127.0.0.2")

            for _ in range(8):
                async with await retry_refused(open_once, attempts=20) as channel:
                    await channel.send_json({"n": 1})
                    await channel.recv_json()
            assert len(attempts) > 8  # some were dropped, and tried again
            idle[1].close()

    asyncio.run(main())
