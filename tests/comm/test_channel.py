"""Tests for pydra.comm.channel: the handshake and transport as a sans-IO state machine, in memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from channelkit import CLIENT_KEY, MALLORY_KEY, SERVER_KEY, Authorizer, pin, raw
from hypothesis import given, settings
from hypothesis import strategies as st

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
    Role,
    State,
    UsageError,
    decode_json,
    encode_json,
)
from pydra.comm.noise import MAX_NONCE


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


def test_a_server_that_is_not_pydras_is_named_by_its_first_bytes():
    """An agent's port where sshd answers: the refusal said only "frame length 1397966893 exceeds limit 256"."""
    initiator = client()
    initiator.receive_data(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu\r\n")
    assert str(failure(drain(initiator))) == (
        "the other side does not speak Pydra's protocol (it began with b'SSH-2.0-OpenSSH_')")


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
