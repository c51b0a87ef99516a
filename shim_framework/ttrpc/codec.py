"""ttrpc, the wire protocol between containerd and its shims, without I/O.

Theory of operation
-------------------
A `Connection` turns bytes into events and events into bytes; it never
touches a socket, a thread or a clock. The server and the client are short
loops around it:

    conn.receive_data(chunk)            # b"" when the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        ...                             # Request, Response, Data, StreamError, ConnectionClosed
    sock.sendall(conn.send(Response(stream_id=..., payload=...)))

Every frame is a 10-byte header (length, stream id, type, flags; big-endian)
and at most 4 MiB of protobuf. The codec checks what ttrpc's Go server checks
(odd, strictly increasing client stream ids; the size limit; a decodable
envelope; Data only on an open stream). A frame that breaks one of those rules
is not fatal: it becomes a `StreamError` naming the stream, the status code
and the reason, which the server answers on that stream and the client turns
into a failed call. An oversized frame is skipped without buffering it.

What *is* fatal is a peer that closes in the middle of a frame: that raises
`RemoteProtocolError`, and the connection stays in the ERROR state. Trying to
send something the protocol forbids (a 5 MiB message, a reused stream id)
raises `LocalProtocolError` and changes nothing.

Stream states follow one table, `_TRANSITIONS`, checked by one function.
Only what the server needs is tracked: which client streams are open and
whether the client may still send Data on them. Unary calls (all that
containerd uses) go IDLE -> AWAITING_REPLY -> closed.
"""

from __future__ import annotations

import enum
import struct

import attrs
from google.protobuf.message import DecodeError

from shim_framework.api.ttrpc import request_pb2
from shim_framework.errors import Code

MAX_MESSAGE = 4 << 20  # ttrpc channel.go messageLengthMax
HEADER = struct.Struct(">IIBB")  # length, stream id, type, flags
HEADER_SIZE = HEADER.size


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flag(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x1  # the sender sends nothing more on this stream
    REMOTE_OPEN = 0x2  # Request only: the sender will keep sending Data
    NO_DATA = 0x4  # Data only: the frame carries no payload


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ProtocolError(Exception):
    """Base class: someone broke the ttrpc protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids; nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol in a way that ends the connection."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")


# --- events -----------------------------------------------------------------


def _check_stream_id(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{attribute.name} {value} does not fit in 32 bits")


def _metadata(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, dict):
        value = value.items()
    return tuple((str(k), str(v)) for k, v in value)  # type: ignore[union-attr]


@attrs.frozen
class Request:
    """A call: opens stream *stream_id* (client streams are odd)."""

    stream_id: int = attrs.field(validator=_check_stream_id)
    service: str
    method: str
    payload: bytes = b""
    timeout_ns: int = 0
    metadata: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_metadata)
    flags: Flag = Flag.NONE

    def metadata_values(self, key: str) -> list[str]:
        """All values for *key* (ttrpc metadata is multi-valued, keys case-insensitive)."""
        key = key.lower()
        return [v for k, v in self.metadata if k.lower() == key]


@attrs.frozen
class Response:
    """The final message of a stream: a payload on success, else a status."""

    stream_id: int = attrs.field(validator=_check_stream_id)
    payload: bytes = b""
    code: int = Code.OK
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == Code.OK


@attrs.frozen
class Data:
    """A streaming payload (ttrpc >= 1.2; containerd's task API never sends one)."""

    stream_id: int = attrs.field(validator=_check_stream_id)
    payload: bytes = b""
    flags: Flag = Flag.NONE


@attrs.frozen
class StreamError:
    """A received frame was refused; stream *stream_id* gets this status."""

    stream_id: int
    code: Code
    message: str


@attrs.frozen
class ConnectionClosed:
    """The peer closed the connection between frames."""


Event = Request | Response | Data | StreamError | ConnectionClosed


# --- stream states ------------------------------------------------------------


class StreamState(enum.Enum):
    OPEN = "open"  # the client may still send Data
    AWAITING_REPLY = "awaiting reply"  # the client is done; the server owes a Response


_CLOSED = None  # a stream not in the table is idle or finished

# (state, what happened) -> next state; any pair not listed is a protocol error.
_TRANSITIONS: dict[tuple[StreamState | None, str], StreamState | None] = {
    (_CLOSED, "recv Request"): StreamState.AWAITING_REPLY,
    (_CLOSED, "recv Request, remote open"): StreamState.OPEN,
    (StreamState.OPEN, "recv Data"): StreamState.OPEN,
    (StreamState.OPEN, "recv Data, remote closed"): StreamState.AWAITING_REPLY,
    (StreamState.OPEN, "send Data"): StreamState.OPEN,
    (StreamState.AWAITING_REPLY, "send Data"): StreamState.AWAITING_REPLY,
    (StreamState.OPEN, "send Response"): _CLOSED,
    (StreamState.AWAITING_REPLY, "send Response"): _CLOSED,
    # A refused stream (StreamError) was never opened but is still answered.
    (_CLOSED, "send Response"): _CLOSED,
}


class InvalidTransition(Exception):
    def __init__(self, state: StreamState | None, what: str) -> None:
        name = "closed" if state is None else state.value
        super().__init__(f"invalid stream transition: {name} => {what}")


def _next_state(state: StreamState | None, what: str) -> StreamState | None:
    try:
        return _TRANSITIONS[(state, what)]
    except KeyError:
        raise InvalidTransition(state, what) from None


# --- the connection -----------------------------------------------------------


class ConnectionState(enum.Enum):
    ACTIVE = "active"
    CLOSED = "closed"  # the peer closed cleanly
    ERROR = "error"  # the peer broke the protocol


class Connection:
    """One ttrpc connection seen from *role*'s side. Not thread-safe: callers lock."""

    def __init__(self, role: Role, *, max_message: int = MAX_MESSAGE) -> None:
        self.role = role
        self.max_message = max_message
        self.state = ConnectionState.ACTIVE
        self._buffer = bytearray()
        self._discarding = 0  # bytes of an oversized frame still to skip
        self._peer_closed = False
        self._closed_reported = False
        self._last_received_request = 0  # server: highest client stream id seen
        self._last_sent_request = 0  # client: highest stream id we opened
        self._streams: dict[int, StreamState] = {}  # server side only

    # -- receiving --

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; b"" means the peer closed its side."""
        if self.state is not ConnectionState.ACTIVE:
            raise RemoteProtocolError(f"connection is {self.state.value}; no more data expected")
        if not data:
            self._peer_closed = True
            return
        if self._discarding:
            skip = min(self._discarding, len(data))
            self._discarding -= skip
            data = data[skip:]
        self._buffer += data

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, or NEED_DATA until more bytes arrive."""
        while True:
            if self.state is ConnectionState.ERROR:
                raise RemoteProtocolError("connection is in ERROR state")
            if self._discarding or len(self._buffer) < HEADER_SIZE:
                return self._end_of_input()
            length, stream_id, type_, flags = HEADER.unpack_from(self._buffer)
            if length > self.max_message:
                return self._skip_oversized(length, stream_id)
            if len(self._buffer) < HEADER_SIZE + length:
                return self._end_of_input()
            payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            event = self._decode(stream_id, type_, Flag(flags & 0x7), payload)
            if event is not None:
                return event

    def _end_of_input(self) -> ConnectionClosed | _Sentinel:
        if not self._peer_closed:
            return NEED_DATA
        if self._buffer or self._discarding:
            self.state = ConnectionState.ERROR
            raise RemoteProtocolError("peer closed the connection in the middle of a frame")
        self.state = ConnectionState.CLOSED
        if self._closed_reported:
            return NEED_DATA
        self._closed_reported = True
        return ConnectionClosed()

    def _skip_oversized(self, length: int, stream_id: int) -> StreamError:
        available = len(self._buffer) - HEADER_SIZE
        skip = min(length, available)
        del self._buffer[: HEADER_SIZE + skip]
        self._discarding = length - skip
        return StreamError(
            stream_id,
            Code.RESOURCE_EXHAUSTED,
            f"message length {length} exceeds the maximum message size of {self.max_message}",
        )

    def _decode(self, stream_id: int, type_: int, flags: Flag, payload: bytes) -> Event | None:
        if self.role is Role.SERVER:
            return self._decode_as_server(stream_id, type_, flags, payload)
        return self._decode_as_client(stream_id, type_, flags, payload)

    def _decode_as_server(
        self, stream_id: int, type_: int, flags: Flag, payload: bytes
    ) -> Event | None:
        if type_ not in (FrameType.REQUEST, FrameType.DATA):
            return None  # ttrpc ignores unknown frame types for forward compatibility
        if stream_id % 2 != 1:
            return StreamError(
                stream_id,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} must be odd for client-initiated streams",
            )
        if type_ == FrameType.DATA:
            return self._receive_data_frame(stream_id, flags, payload)
        if stream_id <= self._last_received_request:
            return StreamError(
                stream_id,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} cannot be reused and must increase "
                f"(last was {self._last_received_request})",
            )
        self._last_received_request = stream_id
        try:
            envelope = request_pb2.Request.FromString(payload)
        except DecodeError as e:
            return StreamError(stream_id, Code.INVALID_ARGUMENT, f"malformed request: {e}")
        remote_open = flags & Flag.REMOTE_OPEN and not flags & Flag.REMOTE_CLOSED
        self._move(stream_id, "recv Request, remote open" if remote_open else "recv Request")
        return Request(
            stream_id=stream_id,
            service=envelope.service,
            method=envelope.method,
            payload=envelope.payload,
            timeout_ns=envelope.timeout_nano,
            metadata=tuple((kv.key, kv.value) for kv in envelope.metadata),
            flags=flags,
        )

    def _receive_data_frame(self, stream_id: int, flags: Flag, payload: bytes) -> Event:
        what = "recv Data, remote closed" if flags & Flag.REMOTE_CLOSED else "recv Data"
        try:
            self._move(stream_id, what)
        except InvalidTransition:
            return StreamError(
                stream_id, Code.INVALID_ARGUMENT, f"stream {stream_id} is not open for data"
            )
        return Data(stream_id, b"" if flags & Flag.NO_DATA else payload, flags)

    def _decode_as_client(
        self, stream_id: int, type_: int, flags: Flag, payload: bytes
    ) -> Event | None:
        if type_ == FrameType.DATA:
            return Data(stream_id, b"" if flags & Flag.NO_DATA else payload, flags)
        if type_ != FrameType.RESPONSE:
            return None  # no version of ttrpc has server-initiated streams
        try:
            envelope = request_pb2.Response.FromString(payload)
        except DecodeError as e:
            return StreamError(stream_id, Code.UNKNOWN, f"malformed response: {e}")
        status = envelope.status
        return Response(
            stream_id=stream_id,
            payload=envelope.payload,
            code=status.code,
            message=status.message,
        )

    def _move(self, stream_id: int, what: str) -> None:
        state = _next_state(self._streams.get(stream_id), what)
        if state is None:
            self._streams.pop(stream_id, None)
        else:
            self._streams[stream_id] = state

    # -- sending --

    def next_stream_id(self) -> int:
        """The id for the client's next call: odd and strictly increasing."""
        return self._last_sent_request + 2 if self._last_sent_request else 1

    def send(self, event: Request | Response | Data) -> bytes:
        """The bytes that put *event* on the wire."""
        if isinstance(event, Request):
            return self._send_request(event)
        if isinstance(event, Response):
            return self._send_response(event)
        if isinstance(event, Data):
            return self._send_data(event)
        raise LocalProtocolError(f"cannot send {type(event).__name__}")

    def _send_request(self, event: Request) -> bytes:
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends requests")
        if event.stream_id % 2 != 1 or event.stream_id <= self._last_sent_request:
            raise LocalProtocolError(
                f"stream id {event.stream_id} must be odd and above {self._last_sent_request}"
            )
        envelope = request_pb2.Request(
            service=event.service,
            method=event.method,
            payload=event.payload,
            timeout_nano=event.timeout_ns,
            metadata=[request_pb2.KeyValue(key=k, value=v) for k, v in event.metadata],
        )
        frame = self._frame(event.stream_id, FrameType.REQUEST, event.flags, envelope)
        self._last_sent_request = event.stream_id
        return frame

    def _send_response(self, event: Response) -> bytes:
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a server sends responses")
        envelope = request_pb2.Response(payload=event.payload)
        if event.code != Code.OK:
            envelope.status.code = event.code
            envelope.status.message = event.message
        frame = self._frame(event.stream_id, FrameType.RESPONSE, Flag.NONE, envelope)
        self._move(event.stream_id, "send Response")
        return frame

    def _send_data(self, event: Data) -> bytes:
        if self.role is Role.SERVER:
            try:
                self._move(event.stream_id, "send Data")
            except InvalidTransition as e:
                raise LocalProtocolError(str(e)) from None
        flags = event.flags | (Flag.NO_DATA if not event.payload else Flag.NONE)
        return self._frame_bytes(event.stream_id, FrameType.DATA, flags, event.payload)

    def _frame(self, stream_id: int, type_: FrameType, flags: Flag, message: object) -> bytes:
        return self._frame_bytes(stream_id, type_, flags, message.SerializeToString())  # type: ignore[attr-defined]

    def _frame_bytes(self, stream_id: int, type_: FrameType, flags: Flag, data: bytes) -> bytes:
        if len(data) > self.max_message:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds the maximum message size "
                f"of {self.max_message}"
            )
        return HEADER.pack(len(data), stream_id, type_, flags) + data
