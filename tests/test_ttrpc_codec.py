"""The sans-I/O ttrpc codec: frames both ways, from one table, and what it refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim_framework.errors import Code
from shim_framework.ttrpc import codec
from shim_framework.ttrpc.codec import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    Flag,
    Request,
    Response,
    Role,
    StreamError,
)


def header(length: int, stream_id: int, type_: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream_id, type_, flags)


# (who sends, event, bytes on the wire); protobuf bytes written out by hand.
REQUEST_BODY = b"\x0a\x03svc" + b"\x12\x01M" + b"\x1a\x01x"
TIMED_BODY = (
    b"\x0a\x03svc\x12\x01M"
    + b"\x20\x80\x94\xeb\xdc\x03"  # timeout_nano = 1_000_000_000
    + b"\x2a\x06\x0a\x01k\x12\x01v"  # metadata k=v
)
STATUS_BODY = b"\x0a\x06\x08\x05\x12\x02nf"  # status {code: 5, message: "nf"}
TABLE = [
    (Role.CLIENT, Request(1, "svc", "M", b"x"), header(11, 1, 1) + REQUEST_BODY),
    (
        Role.CLIENT,
        Request(3, "svc", "M", timeout_ns=10**9, metadata=(("k", "v"),)),
        header(len(TIMED_BODY), 3, 1) + TIMED_BODY,
    ),
    (Role.SERVER, Response(1), header(0, 1, 2)),  # Empty success: a zero-length frame
    (Role.SERVER, Response(5, b"ok"), header(4, 5, 2) + b"\x12\x02ok"),
    (Role.SERVER, Response(7, code=Code.NOT_FOUND, message="nf"), header(8, 7, 2) + STATUS_BODY),
]


def peer(role: Role) -> Role:
    return Role.SERVER if role is Role.CLIENT else Role.CLIENT


def drain(conn: codec.Connection) -> list:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def sender(role: Role) -> codec.Connection:
    conn = codec.Connection(role)
    if role is Role.SERVER:
        return conn
    # Let a client send any odd id from the table.
    conn._last_sent_request = 0
    return conn


@pytest.mark.parametrize(("role", "event", "wire"), TABLE)
def test_encode_matches_the_wire_bytes(role: Role, event, wire: bytes) -> None:
    """Each event encodes to exactly the bytes ttrpc puts on the wire."""
    assert sender(role).send(event) == wire


@pytest.mark.parametrize(("role", "event", "wire"), TABLE)
@pytest.mark.parametrize("feeding", ["whole", "byte by byte", "with trailing bytes"])
def test_decode_gives_back_the_event(role: Role, event, wire: bytes, feeding: str) -> None:
    """The peer decodes those bytes however they are split."""
    receiver = codec.Connection(peer(role))
    if feeding == "whole":
        receiver.receive_data(wire)
        assert drain(receiver) == [event]
    elif feeding == "byte by byte":
        seen = []
        for i in range(len(wire)):
            receiver.receive_data(wire[i : i + 1])
            seen += drain(receiver)
        assert seen == [event]
    else:
        receiver.receive_data(wire + header(20, 99, 1)[:7])
        assert drain(receiver) == [event]


def test_peer_close_between_frames_is_a_clean_close() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() is NEED_DATA
    assert server.state is codec.ConnectionState.CLOSED


def test_peer_close_mid_frame_is_a_remote_protocol_error() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(11, 1, 1) + REQUEST_BODY[:4])
    server.receive_data(b"")
    with pytest.raises(codec.RemoteProtocolError):
        server.next_event()
    assert server.state is codec.ConnectionState.ERROR
    with pytest.raises(codec.RemoteProtocolError):
        server.next_event()


def test_even_stream_id_is_refused_on_that_stream() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(11, 2, 1) + REQUEST_BODY)
    [event] = drain(server)
    assert isinstance(event, StreamError)
    assert (event.stream_id, event.code) == (2, Code.INVALID_ARGUMENT)


def test_reused_stream_id_is_refused() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data((header(11, 5, 1) + REQUEST_BODY) * 2)
    first, second = drain(server)
    assert isinstance(first, Request)
    assert isinstance(second, StreamError) and second.code == Code.INVALID_ARGUMENT


def test_oversized_frame_is_skipped_and_answered_resource_exhausted() -> None:
    """A 5 MiB frame is discarded without buffering; the next frame still decodes."""
    server = codec.Connection(Role.SERVER)
    size = 5 << 20
    server.receive_data(header(size, 1, 1))
    [event] = drain(server)
    assert isinstance(event, StreamError) and event.code == Code.RESOURCE_EXHAUSTED
    chunk = b"\0" * (1 << 20)
    for _ in range(5):
        server.receive_data(chunk)
        assert drain(server) == []
        assert len(server._buffer) == 0
    server.receive_data(header(11, 3, 1) + REQUEST_BODY)
    assert drain(server) == [Request(3, "svc", "M", b"x")]


def test_garbage_envelope_is_invalid_argument() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(3, 1, 1) + b"\xff\xff\xff")
    [event] = drain(server)
    assert isinstance(event, StreamError) and event.code == Code.INVALID_ARGUMENT


def test_unknown_frame_types_are_ignored() -> None:
    """ttrpc skips types it does not know, for forward compatibility."""
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(2, 1, 9) + b"zz" + header(11, 1, 1) + REQUEST_BODY)
    assert drain(server) == [Request(1, "svc", "M", b"x")]


def test_data_for_a_stream_that_is_not_open_is_refused() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(1, 7, 3) + b"x")
    [event] = drain(server)
    assert isinstance(event, StreamError) and event.code == Code.INVALID_ARGUMENT


def test_streaming_request_then_data_until_remote_closed() -> None:
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(11, 1, 1, Flag.REMOTE_OPEN) + REQUEST_BODY)
    server.receive_data(header(1, 1, 3) + b"a")
    server.receive_data(header(0, 1, 3, Flag.REMOTE_CLOSED | Flag.NO_DATA))
    server.receive_data(header(1, 1, 3) + b"b")  # after close: refused
    events = drain(server)
    assert isinstance(events[0], Request)
    assert events[1] == Data(1, b"a", Flag.NONE)
    assert events[2] == Data(1, b"", Flag.REMOTE_CLOSED | Flag.NO_DATA)
    assert isinstance(events[3], StreamError)


def test_sending_an_oversized_message_is_a_local_error_and_sends_nothing() -> None:
    server = codec.Connection(Role.SERVER)
    with pytest.raises(codec.LocalProtocolError):
        server.send(Response(1, b"\0" * (codec.MAX_MESSAGE + 1)))


def test_client_stream_ids_must_be_odd_and_increasing() -> None:
    client = codec.Connection(Role.CLIENT)
    assert client.next_stream_id() == 1
    client.send(Request(1, "s", "m"))
    assert client.next_stream_id() == 3
    for bad in (1, 2, 4):
        with pytest.raises(codec.LocalProtocolError):
            client.send(Request(bad, "s", "m"))


def test_roles_cannot_send_the_other_sides_messages() -> None:
    with pytest.raises(codec.LocalProtocolError):
        codec.Connection(Role.SERVER).send(Request(1, "s", "m"))
    with pytest.raises(codec.LocalProtocolError):
        codec.Connection(Role.CLIENT).send(Response(1))


# --- property tests -------------------------------------------------------------

requests = st.tuples(
    st.text(max_size=30),
    st.text(max_size=10),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=2**62),
    st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=3),
)


@given(st.lists(requests, min_size=1, max_size=8), st.data())
def test_any_split_of_a_valid_stream_decodes_to_the_same_calls(calls, data) -> None:
    client = codec.Connection(Role.CLIENT)
    sent, wire = [], b""
    for service, method, payload, timeout, metadata in calls:
        request = Request(client.next_stream_id(), service, method, payload, timeout, metadata)
        wire += client.send(request)
        sent.append(request)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    server = codec.Connection(Role.SERVER)
    received, start = [], 0
    for cut in [*cuts, len(wire)]:
        server.receive_data(wire[start:cut]) if cut > start else None
        start = max(start, cut)
        received += drain(server)
    assert received == sent


@settings(max_examples=300)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_only_ever_yield_defined_outcomes(garbage: bytes, close: bool) -> None:
    """Whatever arrives, the server codec emits known events or raises RemoteProtocolError."""
    server = codec.Connection(Role.SERVER)
    server.receive_data(garbage)
    if close:
        server.receive_data(b"")
    try:
        events = drain(server)
    except codec.RemoteProtocolError:
        assert close
        return
    for event in events:
        assert isinstance(event, Request | Data | StreamError | ConnectionClosed)
    for event in events:
        if isinstance(event, StreamError):
            reply = server.send(Response(event.stream_id, code=event.code, message=event.message))
            assert reply[8] == 2


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=64),
)
def test_any_header_is_answered_or_skipped(length, stream_id, type_, flags, body) -> None:
    """Wrong types, flags, ids and lengths (up to 4 GiB) never raise or buffer without bound."""
    server = codec.Connection(Role.SERVER)
    server.receive_data(header(length, stream_id, type_, flags) + body)
    events = drain(server)
    assert len(server._buffer) <= codec.HEADER_SIZE + min(length, codec.MAX_MESSAGE)
    for event in events:
        assert isinstance(event, Request | Data | StreamError)
