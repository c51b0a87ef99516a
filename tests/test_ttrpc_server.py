"""polyshim's ttrpc server and client over real unix sockets."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim_framework import errors
from shim_framework.api.task.v2 import shim_pb2 as task
from shim_framework.errors import Code
from shim_framework.ttrpc import Client, Server, Stub, codec

TASK = task.DESCRIPTOR.services_by_name["Task"]
V2, V3 = "containerd.task.v2.Task", "containerd.task.v3.Task"


class ToyTasks:
    """A task service that only knows one thing: Wait blocks until Kill."""

    def __init__(self) -> None:
        self.killed = threading.Event()
        self.wait_cancelled = threading.Event()
        self.waiting = threading.Semaphore(0)
        self.state_threads: set[int] = set()

    def state(self, request, ctx):
        self.state_threads.add(threading.get_native_id())
        if request.id != "c1":
            raise errors.NotFound(f'task "{request.id}": not found')
        return task.StateResponse(id=request.id, pid=42, bundle="/b")

    def wait(self, request, ctx):
        self.waiting.release()
        while not self.killed.wait(0.01):
            if ctx.done.is_set():
                self.wait_cancelled.set()
                raise errors.Cancelled("caller went away")
        return task.WaitResponse(exit_status=137)

    def kill(self, request, ctx):
        self.killed.set()
        return empty_pb2.Empty()

    def pids(self, request, ctx):
        raise RuntimeError("backend exploded")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, ToyTasks, Server]]:
    tasks = ToyTasks()
    server = Server()
    server.register_service(tasks, TASK, name=V2)
    server.register_service(tasks, TASK, name=V3)
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    thread.start()
    yield path, tasks, server
    tasks.killed.set()
    server.shutdown()
    thread.join(5)
    assert not thread.is_alive()


def test_round_trip_on_v2_and_v3_names(served) -> None:
    """One implementation answers both task service names."""
    path, _, _ = served
    with Client.connect(path) as client:
        for name in (V2, V3):
            state = Stub(client, TASK, name=name).State(task.StateRequest(id="c1"))
            assert (state.id, state.pid, state.bundle) == ("c1", 42, "/b")


def test_handler_errors_keep_their_code(served) -> None:
    path, _, _ = served
    with Client.connect(path) as client:
        stub = Stub(client, TASK)
        with pytest.raises(errors.NotFound, match="not found"):
            stub.State(task.StateRequest(id="nope"))
        with pytest.raises(errors.PolyshimError, match="backend exploded") as info:
            stub.Pids(task.PidsRequest(id="c1"))
        assert info.value.code == Code.UNKNOWN


def test_unknown_service_and_method_are_unimplemented(served) -> None:
    path, _, _ = served
    with Client.connect(path) as client:
        with pytest.raises(errors.Unimplemented, match=r"service containerd\.task\.v9\.Task"):
            client.call_raw("containerd.task.v9.Task", "State", b"")
        with pytest.raises(errors.Unimplemented, match="method Frobnicate"):
            client.call_raw(V2, "Frobnicate", b"")
        # Registered service, method the implementation lacks.
        with pytest.raises(errors.Unimplemented, match="method Checkpoint"):
            Stub(client, TASK).Checkpoint(task.CheckpointTaskRequest(id="c1"))


def test_garbage_payload_is_invalid_argument(served) -> None:
    path, _, _ = served
    with Client.connect(path) as client, pytest.raises(errors.InvalidArgument):
        client.call_raw(V2, "State", b"\xff\xff\xff\xff")


def test_fifty_calls_beside_a_blocked_wait_on_one_connection(served) -> None:
    """A Wait that blocks must not hold up State and Kill on the same connection."""
    path, tasks, _ = served
    with Client.connect(path) as client:
        stub = Stub(client, TASK)
        waited: list = []
        waiter = threading.Thread(
            target=lambda: waited.append(stub.Wait(task.WaitRequest(id="c1")))
        )
        waiter.start()
        assert tasks.waiting.acquire(timeout=5)
        results: list = []
        callers = [
            threading.Thread(
                target=lambda: results.append(stub.State(task.StateRequest(id="c1"), timeout=5))
            )
            for _ in range(50)
        ]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        assert len(results) == 50 and all(r.pid == 42 for r in results)
        assert waiter.is_alive() and not waited
        stub.Kill(task.KillRequest(id="c1", signal=9))
        waiter.join(5)
        assert waited[0].exit_status == 137


def test_calls_in_a_row_reuse_idle_threads(served) -> None:
    """A shim's calls come one after another; each must not pay for a new thread."""
    path, tasks, _ = served
    with Client.connect(path) as client:
        stub = Stub(client, TASK)
        for _ in range(100):
            assert stub.State(task.StateRequest(id="c1"), timeout=5).pid == 42
    assert len(tasks.state_threads) <= 5


def test_client_disconnecting_mid_call_cancels_it_and_server_goes_on(served) -> None:
    path, tasks, _ = served
    client = Client.connect(path)
    outcome: list = []

    def wait() -> None:
        try:
            Stub(client, TASK).Wait(task.WaitRequest(id="c1"))
        except errors.PolyshimError as e:
            outcome.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert tasks.waiting.acquire(timeout=5)
    client.close()
    waiter.join(5)
    assert isinstance(outcome[0], errors.Unavailable)
    assert tasks.wait_cancelled.wait(5), "the handler never saw its caller leave"
    with Client.connect(path) as other:
        assert Stub(other, TASK).State(task.StateRequest(id="c1")).pid == 42


def raw_call(path: str, request: codec.Request, timeout: float = 5) -> codec.Event:
    """Send one request with the bare codec and return what comes back."""
    conn = codec.Connection(codec.Role.CLIENT)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(conn.send(request))
        while True:
            conn.receive_data(sock.recv(65536))
            event = conn.next_event()
            if event is not codec.NEED_DATA:
                return event


def test_timeout_nano_is_a_deadline_answered_by_the_server(served) -> None:
    """A call still running at its deadline is answered DEADLINE_EXCEEDED, at the deadline."""
    path, tasks, _ = served
    request = codec.Request(
        1, V2, "Wait", task.WaitRequest(id="c1").SerializeToString(), timeout_ns=200_000_000
    )
    started = time.monotonic()
    response = raw_call(path, request)
    elapsed = time.monotonic() - started
    assert isinstance(response, codec.Response)
    assert response.code == Code.DEADLINE_EXCEEDED
    assert 0.15 < elapsed < 2
    assert tasks.wait_cancelled.wait(5)


def test_client_timeout_gives_deadline_exceeded(served) -> None:
    path, _, _ = served
    with Client.connect(path) as client:
        with pytest.raises(errors.DeadlineExceeded):
            Stub(client, TASK).Wait(task.WaitRequest(id="c1"), timeout=0.2)
        # The connection is still good afterwards.
        assert Stub(client, TASK).State(task.StateRequest(id="c1")).pid == 42


def test_oversized_frame_answers_resource_exhausted_then_serves_on(served) -> None:
    path, _, _ = served
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        size = 5 << 20
        sock.sendall(struct.pack(">IIBB", size, 1, 1, 0) + b"\0" * size)
        good = codec.Connection(codec.Role.CLIENT)
        good._last_sent_request = 1
        sock.sendall(
            good.send(codec.Request(3, V2, "State", task.StateRequest(id="c1").SerializeToString()))
        )
        conn = codec.Connection(codec.Role.CLIENT)
        events: list = []
        while len(events) < 2:
            conn.receive_data(sock.recv(65536))
            while (event := conn.next_event()) is not codec.NEED_DATA:
                events.append(event)
    assert events[0].stream_id == 1 and events[0].code == Code.RESOURCE_EXHAUSTED
    assert events[1].stream_id == 3 and events[1].ok


def test_peer_breaking_framing_loses_only_its_connection(served) -> None:
    path, _, _ = served
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(path)
        bad.sendall(struct.pack(">IIBB", 100, 1, 1, 0) + b"short")
        bad.shutdown(socket.SHUT_WR)
        bad.settimeout(5)
        assert bad.recv(100) == b""  # the server closed it
    with Client.connect(path) as client:
        assert Stub(client, TASK).State(task.StateRequest(id="c1")).pid == 42


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=5))
def test_server_survives_garbage_and_keeps_serving(served, garbage: list[bytes]) -> None:
    """Random bytes end in answers or a closed connection; nothing hangs; others are served."""
    path, _, _ = served
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        for chunk in garbage:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        sock.shutdown(socket.SHUT_WR)
        reader = codec.Connection(codec.Role.CLIENT)
        while True:  # the server must end the conversation: EOF, not a hang
            data = sock.recv(65536)
            if not data:
                break
            reader.receive_data(data)
            while (event := reader.next_event()) is not codec.NEED_DATA:
                assert isinstance(event, codec.Response)
                assert event.code != Code.OK or event.payload is not None
    with Client.connect(path) as client:
        assert Stub(client, TASK).State(task.StateRequest(id="c1"), timeout=5).pid == 42


def test_shutdown_closes_connections_and_wakes_callers(tmp_path: Path) -> None:
    tasks = ToyTasks()
    server = Server()
    server.register_service(tasks, TASK)
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    serving = threading.Thread(target=server.serve, args=(listener,))
    serving.start()
    client = Client.connect(path)
    failure: list = []

    def wait() -> None:
        try:
            Stub(client, TASK).Wait(task.WaitRequest(id="c1"))
        except errors.PolyshimError as e:
            failure.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert tasks.waiting.acquire(timeout=5)
    server.shutdown()
    serving.join(5)
    waiter.join(5)
    assert not serving.is_alive() and not waiter.is_alive()
    assert isinstance(failure[0], errors.Unavailable)
    assert tasks.wait_cancelled.wait(5)
    client.close()
