"""A threaded ttrpc client around the sans-I/O codec.

Used to forward events to containerd, by tests and by tools. Any number of
threads may call at once on one connection: each call takes the next odd
stream id, sends its Request under the write lock and waits for its own
Response, which one reader thread (started with the client) hands over.

Resource handling: the client owns its socket; `close()` (or the context
manager) closes it. Calls waiting when the connection drops fail with
`Unavailable`; a call whose timeout passes fails with `DeadlineExceeded` and
its late Response, if any, is discarded, as the Go client does.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from shim_framework import errors
from shim_framework.ttrpc import codec
from shim_framework.ttrpc.service import methods_of

log = logging.getLogger("polyshim.ttrpc")

M = TypeVar("M", bound=Message)


def unix_path(address: str) -> str:
    """The socket path of `unix:///path` or a bare path."""
    return address.removeprefix("unix://")


class _Call:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: codec.Response | codec.StreamError | None = None


class Client:
    """One ttrpc connection to a server."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._codec = codec.Connection(codec.Role.CLIENT)
        # Lock order: _lock (call table, writes), then _codec_lock. The reader
        # takes only the codec lock, so a blocked send never stops reading.
        self._lock = threading.Lock()
        self._codec_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._closed_reason: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, address: str, timeout: float | None = 10.0) -> Client:
        """Connect to a unix socket given as a path or `unix://` address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(unix_path(address))
        except OSError as e:
            sock.close()
            raise errors.Unavailable(f"ttrpc: cannot connect to {address}: {e}") from e
        sock.settimeout(None)
        return cls(sock)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> M:
        """Make one unary call; raise the `PolyshimError` matching a failed status."""
        payload = self.call_raw(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        try:
            return response_type.FromString(payload)
        except DecodeError as e:
            raise errors.PolyshimError(
                f"ttrpc: {service}/{method}: malformed response payload: {e}"
            ) from e

    def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> bytes:
        """Like `call`, with serialized payloads."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = _Call()
        with self._lock:
            if self._closed_reason is not None:
                raise errors.Unavailable(f"ttrpc: connection closed: {self._closed_reason}")
            with self._codec_lock:
                stream_id = self._codec.next_stream_id()
            request = codec.Request(
                stream_id=stream_id,
                service=service,
                method=method,
                payload=payload,
                timeout_ns=0 if timeout is None else int(timeout * 1e9),
                metadata=tuple(metadata),
            )
            with self._codec_lock:
                data = self._codec.send(request)  # LocalProtocolError: nothing was sent
            self._calls[stream_id] = pending
            try:
                self._sock.sendall(data)
            except OSError as e:
                self._calls.pop(stream_id, None)
                raise errors.Unavailable(f"ttrpc: cannot send {method}: {e}") from e
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not pending.done.wait(remaining):
            with self._lock:
                self._calls.pop(stream_id, None)
            raise errors.DeadlineExceeded(f"ttrpc: {service}/{method}: deadline exceeded")
        result = pending.result
        if result is None:
            raise errors.Unavailable(
                f"ttrpc: {service}/{method}: connection closed: {self._closed_reason}"
            )
        if isinstance(result, codec.StreamError) or not result.ok:
            raise errors.from_status(result.code, result.message)
        return result.payload

    def _read_loop(self) -> None:
        reason = "closed by peer"
        try:
            while True:
                data = self._sock.recv(64 * 1024)
                with self._codec_lock:
                    self._codec.receive_data(data)
                    events = []
                    while (event := self._codec.next_event()) is not codec.NEED_DATA:
                        events.append(event)
                for event in events:
                    if isinstance(event, codec.ConnectionClosed):
                        return
                    if isinstance(event, codec.Response | codec.StreamError):
                        self._deliver(event.stream_id, event)
        except (OSError, codec.ProtocolError) as e:
            reason = str(e) or type(e).__name__
        finally:
            self._fail_all(reason)

    def _deliver(self, stream_id: int, result: codec.Response | codec.StreamError) -> None:
        with self._lock:
            pending = self._calls.pop(stream_id, None)
        if pending is None:
            log.debug("ttrpc: discarding a response for inactive stream %d", stream_id)
            return
        pending.result = result
        pending.done.set()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.done.set()

    def close(self) -> None:
        self._fail_all("closed by client")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stub:
    """Calls a service's RPCs by name: `Stub(client, descriptor).Create(request)`.

    *name* overrides the service name on the wire, e.g. to speak the task API
    as `containerd.task.v3.Task` with the v2 messages (they are identical).
    """

    def __init__(
        self,
        client: Client,
        descriptor: ServiceDescriptor,
        *,
        name: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._client = client
        self._service = name or descriptor.full_name
        self._methods = methods_of(descriptor)
        self._metadata = tuple(metadata)

    def __getattr__(self, rpc: str):
        try:
            method = self._methods[rpc]
        except KeyError:
            raise AttributeError(f"{self._service} has no method {rpc}") from None

        def invoke(request: Message, *, timeout: float | None = None) -> Message:
            return self._client.call(
                self._service,
                rpc,
                request,
                method.response_type,
                timeout=timeout,
                metadata=self._metadata,
            )

        return invoke
