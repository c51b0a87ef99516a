"""A threaded ttrpc server around the sans-I/O codec.

Why threads and not asyncio: a shim process is started for every container
(or pod), and its start-up sits on containerd's critical path. Measured with
`python -X importtime` on the development VM (Python 3.11, warm cache):
`import asyncio` costs 55-80 ms and about 10 MB, `import threading` about
4 ms, `import socket` about 9 ms. One reader thread per connection and a
thread per call in flight cost far less than that, and let a `Wait` that
blocks for the life of a container sit next to `Kill`, `State` and `Delete`
on the same connection. A call thread that finishes waits a while for the
next call (starting a thread costs ~0.3 ms, handing a call to an idle one
~0.02 ms; a container's life is a dozen calls).

Resource handling: `serve()` owns the listening socket's accept loop; each
accepted connection is owned by its reader thread, which closes it when the
peer goes away or breaks the protocol. Calls run in their own threads and
write their response under the connection's write lock; a response for a
connection that is already gone is dropped.

Error handling: a handler raising a `PolyshimError` answers with that error's
code; any other exception answers UNKNOWN with its message (and is logged with
its traceback). Unknown services and methods answer UNIMPLEMENTED. A call with
`timeout_nano` that is still running at its deadline is answered
DEADLINE_EXCEEDED at the deadline, and its context's `done` event is set so a
cooperative handler can stop; its late result is dropped. Frames the codec
refuses are answered on their stream; a peer that breaks the framing loses
its connection, and no other connection notices.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from shim_framework.errors import Code, to_status
from shim_framework.ttrpc import codec
from shim_framework.ttrpc.service import methods_of, python_name

log = logging.getLogger("polyshim.ttrpc")

MAX_CALLS_PER_CONNECTION = 1024  # beyond this a call is refused, not queued
CALL_THREAD_IDLE = 30.0  # seconds an idle call thread waits for another call
READ_CHUNK = 64 * 1024

Handler = Callable[[Any, "CallContext"], Message]


class CallContext:
    """What a handler knows about its call besides the request message."""

    def __init__(self, request: codec.Request, received_at: float) -> None:
        self.service = request.service
        self.method = request.method
        self.metadata = request.metadata
        self.deadline = received_at + request.timeout_ns / 1e9 if request.timeout_ns > 0 else None
        # Set when the caller can no longer receive the answer: the connection
        # closed or the deadline passed. Blocking handlers wait on it too.
        self.done = threading.Event()

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def metadata_values(self, key: str) -> list[str]:
        key = key.lower()
        return [v for k, v in self.metadata if k.lower() == key]


class _Registered:
    def __init__(self, request_type: type[Message], handler: Handler) -> None:
        self.request_type = request_type
        self.handler = handler


class Server:
    """Serves registered ttrpc services on any number of connections."""

    def __init__(self, *, max_calls_per_connection: int = MAX_CALLS_PER_CONNECTION) -> None:
        self._services: dict[str, dict[str, _Registered]] = {}
        self._max_calls = max_calls_per_connection
        self._lock = threading.Lock()
        self._connections: set[_ServerConnection] = set()
        self._listeners: list[socket.socket] = []
        self._stopping = threading.Event()
        self._deadlines = _DeadlineWatcher()
        self._call_threads = _CallThreads()
        self.on_connection_closed: Callable[[], None] | None = None

    # -- registration --

    def register(
        self, service: str, method: str, request_type: type[Message], handler: Handler
    ) -> None:
        self._services.setdefault(service, {})[method] = _Registered(request_type, handler)

    def register_service(
        self, implementation: object, descriptor: ServiceDescriptor, *, name: str | None = None
    ) -> None:
        """Serve *descriptor*'s RPCs (as *name*, default its full name) by calling
        `implementation.<snake_case rpc>(request, ctx)`; RPCs it lacks stay UNIMPLEMENTED."""
        service = name or descriptor.full_name
        for method in methods_of(descriptor).values():
            handler = getattr(implementation, python_name(method.name), None)
            if handler is not None:
                self.register(service, method.name, method.request_type, handler)

    # -- serving --

    def serve(self, listener: socket.socket) -> None:
        """Accept connections on *listener* until `shutdown()`; blocks."""
        with self._lock:
            self._listeners.append(listener)
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            conn = _ServerConnection(self, sock)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._connections.add(conn)
            threading.Thread(target=conn.run, name="ttrpc-conn", daemon=True).start()

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting; give calls in flight up to *grace* seconds to answer; then close
        every connection (calls still running see `ctx.done`)."""
        self._stopping.set()
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
            listener.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._calls_in_flight():
            time.sleep(0.01)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        self._deadlines.stop()

    def _calls_in_flight(self) -> int:
        with self._lock:
            connections = list(self._connections)
        return sum(conn.calls_in_flight() for conn in connections)

    def _forget(self, conn: _ServerConnection) -> None:
        with self._lock:
            self._connections.discard(conn)
        if self.on_connection_closed is not None:
            self.on_connection_closed()

    def _lookup(self, request: codec.Request) -> _Registered | tuple[Code, str]:
        methods = self._services.get(request.service)
        if methods is None:
            return Code.UNIMPLEMENTED, f"service {request.service}"
        registered = methods.get(request.method)
        if registered is None:
            return Code.UNIMPLEMENTED, f"method {request.method}"
        return registered


class _ServerConnection:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self._codec = codec.Connection(codec.Role.SERVER)
        # Lock order: _write_lock, then _codec_lock. The reader takes only the
        # codec lock, so a peer that stops reading cannot stop us reading.
        self._write_lock = threading.Lock()
        self._codec_lock = threading.Lock()
        self._pending: dict[int, CallContext] = {}  # calls owed a response
        self._closed = False

    def run(self) -> None:
        try:
            self._read_loop()
        except codec.RemoteProtocolError as e:
            log.warning("ttrpc: closing connection: %s", e)
        except OSError as e:
            if not self._closed:  # else: we closed it ourselves (shutdown)
                log.debug("ttrpc: connection error: %s", e)
        finally:
            self.close()
            self._server._forget(self)

    def _read_loop(self) -> None:
        while True:
            data = self._sock.recv(READ_CHUNK)
            for event in self._decode(data):
                if isinstance(event, codec.ConnectionClosed):
                    return
                self._handle(event)

    def _decode(self, data: bytes) -> list[codec.Event]:
        events = []
        with self._codec_lock:
            self._codec.receive_data(data)
            while (event := self._codec.next_event()) is not codec.NEED_DATA:
                events.append(event)
        return events

    def _handle(self, event: codec.Event) -> None:
        if isinstance(event, codec.StreamError):
            self._send(codec.Response(event.stream_id, code=event.code, message=event.message))
        elif isinstance(event, codec.Request):
            self._start_call(event)
        # Data on a stream whose (unary) call is running is dropped, as ttrpc does:
        # no registered method streams.

    def _start_call(self, request: codec.Request) -> None:
        found = self._server._lookup(request)
        if isinstance(found, tuple):
            self._send(codec.Response(request.stream_id, code=found[0], message=found[1]))
            return
        ctx = CallContext(request, time.monotonic())
        with self._write_lock:
            accepted = len(self._pending) < self._server._max_calls
            if accepted:
                self._pending[request.stream_id] = ctx
        if not accepted:
            limit = self._server._max_calls
            self._send(
                codec.Response(
                    request.stream_id,
                    code=Code.RESOURCE_EXHAUSTED,
                    message=f"too many calls in flight on this connection (limit {limit})",
                )
            )
            return
        if ctx.deadline is not None:
            self._server._deadlines.add(ctx.deadline, self, request.stream_id)
        self._server._call_threads.run(self._run_call, request, found, ctx)

    def _run_call(self, request: codec.Request, registered: _Registered, ctx: CallContext) -> None:
        try:
            message = registered.request_type.FromString(request.payload)
        except DecodeError as e:
            text = f"malformed {request.method} request: {e}"
            self._answer(request.stream_id, Code.INVALID_ARGUMENT, text)
            return
        began = time.monotonic()
        try:
            result = registered.handler(message, ctx)
            payload = result.SerializeToString()
        except Exception as e:
            code, text = to_status(e)
            if code == Code.UNKNOWN:
                log.exception("ttrpc: %s/%s failed", request.service, request.method)
            else:
                log.info("ttrpc: %s failed: %s", request.method, text)
            self._answer(request.stream_id, code, text)
            return
        log.debug("ttrpc: %s took %.1f ms", request.method, (time.monotonic() - began) * 1000)
        self._answer(request.stream_id, Code.OK, "", payload)

    def _answer(self, stream_id: int, code: Code, message: str, payload: bytes = b"") -> None:
        """Send the one response a call gets; later attempts (deadline vs result) are dropped.

        The call stays in flight until its bytes are written, so a graceful shutdown
        that waits for calls in flight never cuts a reply short."""
        with self._write_lock:
            ctx = self._pending.get(stream_id)
            if ctx is None:
                return
            ctx.done.set()
            try:
                self._send_locked(codec.Response(stream_id, payload, code, message))
            except codec.LocalProtocolError as e:  # e.g. a response over 4 MiB
                too_big = codec.Response(stream_id, code=Code.RESOURCE_EXHAUSTED, message=str(e))
                self._send_locked(too_big)
            del self._pending[stream_id]

    def calls_in_flight(self) -> int:
        with self._write_lock:
            return len(self._pending)

    def expire(self, stream_id: int) -> None:
        self._answer(stream_id, Code.DEADLINE_EXCEEDED, "context deadline exceeded")

    def _send(self, response: codec.Response) -> None:
        with self._write_lock:
            self._send_locked(response)

    def _send_locked(self, response: codec.Response) -> None:
        if self._closed:
            return
        with self._codec_lock:
            data = self._codec.send(response)
        try:
            self._sock.sendall(data)
        except OSError as e:
            log.debug("ttrpc: dropping response to a closed connection: %s", e)

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, {}
        for ctx in pending.values():
            ctx.done.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class _CallThreads:
    """Threads for calls: an idle one takes the next call, and with none idle a new one
    starts. Never a fixed number: a call queued behind Waits that block for a task's life
    could wait as long. A thread that gets no call for CALL_THREAD_IDLE seconds ends."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., None], tuple]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call and not yet promised one

    def run(self, call: Callable[..., None], *args: Any) -> None:
        with self._lock:  # promising a call to an idle thread and queueing it are one step
            if self._idle:
                self._idle -= 1
                self._calls.put((call, args))
                return
        threading.Thread(target=self._work, args=(call, args), name="ttrpc-call",
                         daemon=True).start()  # fmt: skip

    def _work(self, call: Callable[..., None], args: tuple) -> None:
        while True:
            try:
                call(*args)
            except Exception:  # _run_call answers its own errors; this is a bug
                log.exception("ttrpc: a call thread caught what its call did not")
            del call, args  # an idle thread must not keep the last request and connection alive
            with self._lock:
                self._idle += 1
            try:
                call, args = self._calls.get(timeout=CALL_THREAD_IDLE)
            except queue.Empty:
                with self._lock:
                    try:  # promised one between the timeout and the lock: take it
                        call, args = self._calls.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


class _DeadlineWatcher:
    """One thread that answers calls whose `timeout_nano` ran out."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _ServerConnection, int]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, deadline: float, conn: _ServerConnection, stream_id: int) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), conn, stream_id))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ttrpc-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, conn, stream_id = heapq.heappop(self._heap)
            conn.expire(stream_id)
