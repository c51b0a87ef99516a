"""polyshim's ttrpc client and wire types against containerd's own code.

The client side: start Debian's `containerd-shim-runc-v2` through its own
`start` protocol (under a private containerd that provides TTRPC_ADDRESS)
and drive a busybox container through the whole task lifecycle with
polyshim's client. The event side: forward a TaskExit to containerd's ttrpc
events endpoint and see it arrive at subscribers with the right fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from shim_framework import errors
from shim_framework.api.events import task_pb2 as events_pb2
from shim_framework.api.task.v2 import shim_pb2 as task
from shim_framework.api.types import task_pb2 as task_types
from shim_framework.events import Publisher, forward, forward_request
from shim_framework.ttrpc import Client, Stub
from tests.harness import PrivateContainerd, make_bundle
from tests.harness.events import CtrEvents, EventWatcher

pytestmark = pytest.mark.integration

TASK = task.DESCRIPTOR.services_by_name["Task"]


def open_log_fifo(bundle: Path) -> int:
    """Create the bundle's `log` FIFO and hold it open as containerd does (RDWR, non-blocking)."""
    os.mkfifo(bundle / "log")
    return os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)


def read_available(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def start_runc_shim(ctrd: PrivateContainerd, bundle: Path, container_id: str) -> tuple[str, str]:
    """Run the shim's `start` action as containerd would; return (address, task service name)."""
    shim = ctrd.install.shim_runc_v2
    argv = [
        str(shim),
        "-namespace", ctrd.namespace,
        "-address", str(ctrd.address),
        "-publish-binary", str(ctrd.install.containerd),
        "-id", container_id,
        "start",
    ]  # fmt: skip
    env = ctrd.environ() | {
        "TTRPC_ADDRESS": str(ctrd.ttrpc_address),
        "GRPC_ADDRESS": str(ctrd.address),
        "NAMESPACE": ctrd.namespace,
    }
    result = subprocess.run(
        argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout.decode().strip()
    if text.startswith("{"):  # 1.7+ shims may answer JSON {"version", "address", "protocol"}
        answer = json.loads(text)
        version = answer.get("version", 2)
        return answer["address"], f"containerd.task.v{version}.Task"
    return text, "containerd.task.v2.Task"


def assert_gone(address: str, timeout: float = 10) -> None:
    """The shim at *address* exited: its socket no longer accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            Client.connect(address, timeout=1).close()
        except errors.Unavailable:
            return
        time.sleep(0.05)
    raise AssertionError(f"the shim at {address} is still serving after Shutdown")


def test_runc_v2_shim_driven_by_polyshim_client(containerd: PrivateContainerd, tmp_path: Path):
    """Create, Start, Wait, State, Delete, Shutdown a busybox container through the real shim."""
    container_id = f"peer-{secrets.token_hex(4)}"
    bundle = make_bundle(
        tmp_path / "bundle", ["sh", "-c", "echo hello from runc-v2; echo oops >&2; exit 3"]
    )
    log_fd = open_log_fifo(bundle)
    stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
    os.mkfifo(stdout_path)
    os.mkfifo(stderr_path)
    stdout_fd = os.open(stdout_path, os.O_RDONLY | os.O_NONBLOCK)
    stderr_fd = os.open(stderr_path, os.O_RDONLY | os.O_NONBLOCK)
    watcher = EventWatcher(containerd)
    address, service = start_runc_shim(containerd, bundle, container_id)
    assert address.startswith("unix:///")
    ns = [("containerd-namespace-ttrpc", containerd.namespace)]
    try:
        with Client.connect(address) as client:
            shim = Stub(client, TASK, name=service, metadata=ns)
            created = shim.Create(
                task.CreateTaskRequest(
                    id=container_id,
                    bundle=str(bundle),
                    stdout=str(stdout_path),
                    stderr=str(stderr_path),
                )
            )
            assert created.pid > 0
            connected = shim.Connect(task.ConnectRequest(id=container_id))
            assert connected.task_pid == created.pid and connected.shim_pid > 0
            state = shim.State(task.StateRequest(id=container_id), timeout=5)
            assert state.status == task_types.CREATED
            assert state.stdout == str(stdout_path) and state.bundle == str(bundle)

            started = shim.Start(task.StartRequest(id=container_id))
            assert started.pid == created.pid
            waited = shim.Wait(task.WaitRequest(id=container_id), timeout=30)
            assert waited.exit_status == 3
            assert waited.exited_at.seconds > 0

            state = shim.State(task.StateRequest(id=container_id), timeout=5)
            assert (state.status, state.exit_status) == (task_types.STOPPED, 3)
            with pytest.raises(errors.NotFound):
                shim.State(task.StateRequest(id=container_id, exec_id="no-such-exec"))

            deleted = shim.Delete(task.DeleteRequest(id=container_id))
            assert (deleted.pid, deleted.exit_status) == (created.pid, 3)
            with pytest.raises(errors.NotFound):
                shim.Delete(task.DeleteRequest(id=container_id))

            # The shim publishes asynchronously and may not flush before it exits.
            watcher.wait_for(
                lambda s: s.topic == "/tasks/delete" and s.event.container_id == container_id
            )
            # The shim may exit before its reply gets out; containerd accepts both.
            with contextlib.suppress(errors.Unavailable):
                shim.Shutdown(task.ShutdownRequest(id=container_id), timeout=5)
        assert_gone(address)
        assert read_available(stdout_fd) == b"hello from runc-v2\n"
        assert read_available(stderr_fd) == b"oops\n"

        # The shim published the lifecycle to containerd; our event types decode it.
        exit_seen = watcher.wait_for(
            lambda s: s.topic == "/tasks/exit" and s.event.container_id == container_id
        )
        assert (exit_seen.event.pid, exit_seen.event.exit_status) == (created.pid, 3)
        assert exit_seen.type_url == "containerd.events.TaskExit"
        assert watcher.topics_for(container_id) == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ]
    finally:
        watcher.close()
        for fd in (stdout_fd, stderr_fd, log_fd):
            os.close(fd)


def test_task_exit_forwarded_by_polyshim_reaches_subscribers(containerd: PrivateContainerd):
    """A TaskExit sent with our client shows up in `ctr events` and the gRPC events API."""
    watcher = EventWatcher(containerd)
    ctr_events = CtrEvents(containerd, watcher)
    try:
        exit_event = events_pb2.TaskExit(
            container_id="c-forwarded", id="c-forwarded", pid=4242, exit_status=137
        )
        exit_event.exited_at.FromSeconds(1_700_000_000)
        with Client.connect(str(containerd.ttrpc_address)) as client:
            forward(client, forward_request(containerd.namespace, exit_event))

        seen = watcher.wait_for(lambda s: s.topic == "/tasks/exit")
        assert seen.namespace == containerd.namespace
        assert seen.type_url == "containerd.events.TaskExit"
        assert seen.event == exit_event
        assert abs(seen.timestamp.timestamp() - time.time()) < 60

        line = ctr_events.wait_for_line(lambda line: "/tasks/exit" in line)
        assert containerd.namespace in line and "/tasks/exit" in line
        assert '"container_id":"c-forwarded"' in line and '"exit_status":137' in line
    finally:
        ctr_events.close()
        watcher.close()


def test_containerd_refuses_an_envelope_without_a_valid_namespace(containerd: PrivateContainerd):
    """containerd validates what we forward; its refusal comes back as InvalidArgument."""
    with Client.connect(str(containerd.ttrpc_address)) as client:
        request = forward_request("bad namespace!", events_pb2.TaskOOM(container_id="c"))
        with pytest.raises(errors.InvalidArgument):
            forward(client, request)


def test_publisher_retries_until_containerd_is_reachable(
    containerd: PrivateContainerd, tmp_path: Path
):
    """Events published while containerd cannot be reached arrive, in order, once it can."""
    link = tmp_path / "ttrpc.sock"  # does not exist yet: every Forward fails
    with EventWatcher(containerd) as watcher:
        publisher = Publisher(str(link), containerd.namespace)
        try:
            for n in range(3):
                publisher.publish(events_pb2.TaskOOM(container_id=f"queued-{n}"))
            assert not publisher.flush(timeout=0.5)  # still retrying
            link.symlink_to(containerd.ttrpc_address)
            assert publisher.flush(timeout=20)
            watcher.wait_for(lambda s: s.event.container_id == "queued-2", timeout=10)
            oom_ids = [s.event.container_id for s in watcher.seen if s.topic == "/tasks/oom"]
            assert oom_ids == ["queued-0", "queued-1", "queued-2"]
        finally:
            publisher.close()
