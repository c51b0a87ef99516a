"""Task events, and the publisher that forwards them to containerd.

A shim reports `/tasks/create`, `/tasks/exit` and the rest by calling
`containerd.services.events.ttrpc.v1.Events/Forward` on containerd's ttrpc
socket (TTRPC_ADDRESS). Each event travels as an `Envelope` holding a
timestamp, the namespace, the topic and the event packed in an `Any` whose
type URL is the bare message name: containerd 1.6 looks the name up verbatim,
so a `type.googleapis.com/` prefix would make its consumers fail.

Resource handling: a `Publisher` owns one worker thread and one connection,
dialled lazily and re-dialled after a failure. Events leave in the order they
were published. `close()` flushes the queue (bounded by a timeout) before
closing the connection.

Error handling: a failed Forward is retried after 1 s, 2 s, ... up to
`retries` times, then dropped with a log line, as containerd's own shim
publisher does. Errors containerd will give again (an invalid envelope) are
not retried.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from shim_framework import errors
from shim_framework.api.events import task_pb2 as events_pb2
from shim_framework.api.services.events.ttrpc.v1 import events_pb2 as forward_pb2
from shim_framework.ttrpc.client import Client, Stub

log = logging.getLogger("polyshim.events")

FORWARD_TIMEOUT = 5.0  # seconds per Forward, as containerd's shim publisher uses
NAMESPACE_KEY = "containerd-namespace-ttrpc"
FORWARD_SERVICE = forward_pb2.DESCRIPTOR.services_by_name["Events"]

TOPICS: dict[str, str] = {
    cls.DESCRIPTOR.full_name: topic
    for cls, topic in (
        (events_pb2.TaskCreate, "/tasks/create"),
        (events_pb2.TaskStart, "/tasks/start"),
        (events_pb2.TaskExit, "/tasks/exit"),
        (events_pb2.TaskDelete, "/tasks/delete"),
        (events_pb2.TaskExecAdded, "/tasks/exec-added"),
        (events_pb2.TaskExecStarted, "/tasks/exec-started"),
        (events_pb2.TaskOOM, "/tasks/oom"),
        (events_pb2.TaskPaused, "/tasks/paused"),
        (events_pb2.TaskResumed, "/tasks/resumed"),
        (events_pb2.TaskCheckpointed, "/tasks/checkpointed"),
    )
}


def pack(message: Message) -> any_pb2.Any:
    """An Any with the bare type URL containerd expects (`containerd.events.TaskExit`)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def type_name(type_url: str) -> str:
    """The message name of a type URL, with or without a `host/` prefix."""
    return type_url.rsplit("/", 1)[-1]


def topic_of(message: Message) -> str:
    try:
        return TOPICS[message.DESCRIPTOR.full_name]
    except KeyError:
        raise errors.InvalidArgument(
            f"event {message.DESCRIPTOR.full_name}: no task topic is known for it"
        ) from None


def forward_request(
    namespace: str, message: Message, *, topic: str | None = None
) -> forward_pb2.ForwardRequest:
    """The Forward request carrying *message*, stamped now."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return forward_pb2.ForwardRequest(
        envelope=forward_pb2.Envelope(
            timestamp=stamp,
            namespace=namespace,
            topic=topic or topic_of(message),
            event=pack(message),
        )
    )


def forward(client: Client, request: forward_pb2.ForwardRequest) -> None:
    """Send one Forward now, on *client*'s connection to containerd's ttrpc socket."""
    namespace = request.envelope.namespace
    stub = Stub(client, FORWARD_SERVICE, metadata=[(NAMESPACE_KEY, namespace)])
    stub.Forward(request, timeout=FORWARD_TIMEOUT)


_FINAL = (errors.InvalidArgument, errors.Unimplemented, errors.NotFound)


class Publisher:
    """Forwards events to containerd in order, from one worker thread."""

    def __init__(self, address: str, namespace: str, *, retries: int = 5) -> None:
        self.address = address
        self.namespace = namespace
        self.retries = retries
        self._queue: collections.deque[forward_pb2.ForwardRequest] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._client: Client | None = None
        self._worker = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        self._worker.start()

    def publish(self, message: Message, *, topic: str | None = None) -> None:
        """Queue *message* for containerd; returns at once."""
        request = forward_request(self.namespace, message, topic=topic)
        with self._cond:
            if self._closing:
                log.warning("publisher closed; dropping %s", request.envelope.topic)
                return
            self._queue.append(request)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was sent or given up; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush (up to *timeout*), stop the worker, close the connection."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                request = self._queue.popleft()
                self._busy = True
            try:
                self._send_with_retries(request)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send_with_retries(self, request: forward_pb2.ForwardRequest) -> None:
        topic = request.envelope.topic
        for attempt in range(self.retries + 1):
            try:
                self._forward(request)
                return
            except _FINAL as e:
                log.error("containerd refused event %s: %s", topic, e)
                return
            except errors.PolyshimError as e:
                self._drop_connection()
                if attempt == self.retries or self._closing:
                    log.error("giving up on event %s after %d attempts: %s", topic, attempt + 1, e)
                    return
                log.warning("forwarding event %s failed (%s); retrying", topic, e)
                time.sleep(attempt + 1)

    def _forward(self, request: forward_pb2.ForwardRequest) -> None:
        if self._client is None or self._client.closed:
            self._client = Client.connect(self.address, timeout=FORWARD_TIMEOUT)
        forward(self._client, request)

    def _drop_connection(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
