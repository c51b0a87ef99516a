"""Watching a private containerd's event stream through its gRPC Events API."""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from shim_framework.api.events import task_pb2 as events_pb2
from shim_framework.api.services.events.v1 import events_pb2 as grpc_events_pb2
from shim_framework.api.services.events.v1 import events_pb2_grpc

from .containerd import PrivateContainerd

_EVENT_TYPES = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        events_pb2.TaskCreate,
        events_pb2.TaskStart,
        events_pb2.TaskExit,
        events_pb2.TaskDelete,
        events_pb2.TaskExecAdded,
        events_pb2.TaskExecStarted,
        events_pb2.TaskOOM,
        events_pb2.TaskPaused,
        events_pb2.TaskResumed,
        events_pb2.TaskCheckpointed,
    )
}


MARKER_TOPIC = "/polyshim-test/marker"


def publish_marker(
    stub: events_pb2_grpc.EventsStub, namespace: str
) -> grpc_events_pb2.PublishRequest:
    """Publish an event on MARKER_TOPIC: proof, once seen, that a subscriber is live."""
    event = events_pb2.TaskOOM(container_id="marker")
    request = grpc_events_pb2.PublishRequest(
        topic=MARKER_TOPIC,
        event=any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()),
    )
    stub.Publish(request, metadata=[("containerd-namespace", namespace)], timeout=5)
    return request


class Seen:
    """One event as a subscriber sees it."""

    def __init__(self, envelope: grpc_events_pb2.Envelope) -> None:
        self.namespace = envelope.namespace
        self.topic = envelope.topic
        self.type_url = envelope.event.type_url
        self.timestamp = envelope.timestamp.ToDatetime()
        cls = _EVENT_TYPES.get(self.type_url.rsplit("/", 1)[-1])
        self.event: Message | None = cls.FromString(envelope.event.value) if cls else None

    def __repr__(self) -> str:
        return f"<{self.namespace} {self.topic} {self.event}>"


class EventWatcher:
    """Subscribes to every event of *ctrd* from construction until `close()`."""

    def __init__(self, ctrd: PrivateContainerd, filters: tuple[str, ...] = ()) -> None:
        self._channel = grpc.insecure_channel(f"unix://{ctrd.address}")
        stub = events_pb2_grpc.EventsStub(self._channel)
        self._stream = stub.Subscribe(grpc_events_pb2.SubscribeRequest(filters=list(filters)))
        self._cond = threading.Condition()
        self.seen: list[Seen] = []
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()
        self._wait_until_subscribed(stub, ctrd.namespace)

    def _wait_until_subscribed(self, stub: events_pb2_grpc.EventsStub, namespace: str) -> None:
        """Publish a marker until it comes back: from then on nothing is missed."""
        self._publish_marker = lambda: publish_marker(stub, namespace)
        request = self._publish_marker()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._cond:
                if self._cond.wait_for(
                    lambda: any(s.topic == request.topic for s in self.seen), 0.2
                ):
                    self.seen = [s for s in self.seen if s.topic != request.topic]
                    return
            self._publish_marker()
        raise AssertionError("containerd's event subscription never became active")

    def _collect(self) -> None:
        try:
            for envelope in self._stream:
                with self._cond:
                    self.seen.append(Seen(envelope))
                    self._cond.notify_all()
        except grpc.RpcError:
            pass

    def wait_for(self, predicate: Callable[[Seen], bool], timeout: float = 10) -> Seen:
        """The first event matching *predicate*, waiting up to *timeout* seconds."""
        with self._cond:
            found: list[Seen] = []

            def match() -> bool:
                found[:] = [s for s in self.seen if predicate(s)][:1]
                return bool(found)

            if not self._cond.wait_for(match, timeout):
                raise AssertionError(f"no matching event within {timeout}s; saw {self.seen}")
            return found[0]

    def publish_marker(self) -> None:
        self._publish_marker()

    def topics_for(self, container_id: str) -> list[str]:
        with self._cond:
            return [
                s.topic
                for s in self.seen
                if s.event is not None and getattr(s.event, "container_id", "") == container_id
            ]

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()

    def __enter__(self) -> EventWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CtrEvents:
    """`ctr events` running against *ctrd*: the events as a user sees them, one line each."""

    def __init__(self, ctrd: PrivateContainerd, watcher: EventWatcher) -> None:
        self._proc = subprocess.Popen(ctrd.ctr_command("events"), stdout=subprocess.PIPE)
        self._buffer = b""
        deadline = time.monotonic() + 10
        while not self._read_line(lambda line: MARKER_TOPIC in line, 0.2):
            if time.monotonic() > deadline:
                raise AssertionError("ctr events never showed a marker event")
            watcher.publish_marker()

    def _read_line(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode()
                if predicate(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self._proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self._proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self._buffer += chunk

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 10) -> str:
        """The next line "<time> <namespace> <topic> <event JSON>" matching *predicate*."""
        line = self._read_line(predicate, timeout)
        if line is None:
            raise AssertionError(f"ctr events printed no matching line within {timeout}s")
        return line

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
