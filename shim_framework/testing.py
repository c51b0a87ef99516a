"""The backend conformance kit: one suite every backend runs, polyshim's own and third-party.

    from shim_framework.testing import check_backend

    def test_conformance(tmp_path):
        check_backend(MyBackend, MyPrograms(), tmp_path)

`check_backend` drives the backend through polyshim's real task service, as
containerd would (Create, Start, Wait, Kill, Delete, Exec, Pids and the rest),
with a real reaper and real FIFOs, and checks what containerd relies on:
exit statuses, 128+signal on kill, NotFound for a finished process,
`/tasks/*` events in order, output and input through stdio, a Delete that
works before Start, Pids that list the init, and "not implemented, naming
the backend" for every capability the backend does not declare. Only the
event sink is a stand-in (containerd's events socket is not needed to check
a backend).

The test process must be root (backends create containers) and the checks
must run in the main thread (the reaper installs signal handling there).
A backend's tests say how to express three small programs in its world:

- `exit`: print MARKER on stdout, exit with the given code;
- `sleep`: run until killed;
- `echo-line`: read one line from stdin, print `got: <line>`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import any_pb2

from shim_framework import _platform
from shim_framework.api.task.v2 import shim_pb2 as api
from shim_framework.api.types import task_pb2 as task_types
from shim_framework.backend import Backend, Cap
from shim_framework.errors import NotFound, Unimplemented
from shim_framework.events import topic_of
from shim_framework.reaper import Reaper
from shim_framework.registry import Registry
from shim_framework.task_service import TaskService

MARKER = "polyshim-conformance"
TIMEOUT = 20.0


class Programs(Protocol):
    """How a backend's test suite expresses the kit's programs."""

    def bundle(self, directory: Path) -> Path:
        """A bundle (config.json and its root filesystem) the kit puts processes in."""

    def process(self, program: str, code: int = 0) -> dict[str, Any]:
        """The OCI `process` object running *program* ("exit", "sleep", "echo-line")."""


class RecordingEvents:
    """Stands in for containerd's events endpoint: keeps what the task service publishes."""

    def __init__(self) -> None:
        self.topics: list[tuple[str, str]] = []  # (topic, process id or container id)

    def publish(self, message: Any, *, topic: str | None = None) -> None:
        ident = getattr(message, "id", "") or getattr(message, "container_id", "")
        self.topics.append((topic or topic_of(message), ident))

    def close(self, timeout: float = 0) -> None:
        return None


class _Kit:
    def __init__(self, backend: type[Backend], programs: Programs, work: Path) -> None:
        self.backend = backend
        self.programs = programs
        self.work = work
        self.events = RecordingEvents()
        self.reaper = Reaper()
        registry = Registry.of(backend)
        self.service = TaskService(
            namespace="conformance",
            publisher=self.events,  # type: ignore[arg-type]
            reaper=self.reaper,
            registry=registry,
            state_dir=work / "state",
        )
        self.reaper.on_exit = self.service.on_exit
        self.options = any_pb2.Any(
            type_url="runtimeoptions.v1.Options",
            value=_runtime_options(f'default_backend = "{backend.name}"\n'),
        )

    def container(self, program: str, code: int = 0, *, stdin: bool = False) -> _Container:
        cid = f"kit-{secrets.token_hex(4)}"
        bundle = self.programs.bundle(self.work / cid)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"] = self.programs.process(program, code)
        (bundle / "config.json").write_text(json.dumps(spec))
        return _Container(self, cid, bundle, stdin)


class _Container:
    def __init__(self, kit: _Kit, cid: str, bundle: Path, stdin: bool) -> None:
        self.kit, self.id, self.bundle = kit, cid, bundle
        self.stdout_path = bundle.parent / f"{cid}-stdout"
        os.mkfifo(self.stdout_path)
        self.stdout = os.open(self.stdout_path, os.O_RDONLY | os.O_NONBLOCK)
        self.stdin_path = bundle.parent / f"{cid}-stdin" if stdin else None
        self.stdin: int | None = None
        if self.stdin_path is not None:
            os.mkfifo(self.stdin_path)
            reader = os.open(
                self.stdin_path, os.O_RDONLY | os.O_NONBLOCK
            )  # lets us open for writing
            self.stdin = os.open(self.stdin_path, os.O_WRONLY)
            os.close(reader)

    def create(self) -> int:
        request = api.CreateTaskRequest(
            id=self.id,
            bundle=str(self.bundle),
            stdout=str(self.stdout_path),
            stdin=str(self.stdin_path or ""),
            options=self.kit.options,
        )
        return self.kit.service.create(request).pid

    def output(self) -> str:
        data = b""
        while True:
            try:
                chunk = os.read(self.stdout, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")

    def close(self) -> None:
        for fd in (self.stdout, self.stdin):
            if fd is not None:
                os.close(fd)


def check_backend(backend: type[Backend], programs: Programs, work: Path) -> None:
    """Run every conformance check against *backend*; the first failure raises with its name."""
    probe = backend.probe({})
    assert probe.ok, f"backend {backend.name} cannot run here: {probe.reason}"
    _platform.set_child_subreaper()  # container processes re-parent to us, as to a shim
    kit = _Kit(backend, programs, work)
    kit.reaper.start()
    try:
        for check in CHECKS:
            try:
                check(kit)
            except AssertionError as e:
                raise AssertionError(f"conformance check {check.__name__}: {e}") from e
    finally:
        kit.reaper.stop()
        _platform.set_child_subreaper(False)


# -- the checks ----------------------------------------------------------------------------------


def lifecycle_reports_exit_status_output_and_events(kit: _Kit) -> None:
    box = kit.container("exit", 7)
    try:
        pid = box.create()
        state = kit.service.state(api.StateRequest(id=box.id))
        assert state.status == task_types.CREATED, f"state after Create: {state.status}"
        started = kit.service.start(api.StartRequest(id=box.id))
        assert started.pid == pid or not pid, f"Start pid {started.pid} != Create pid {pid}"
        waited = _wait(kit, box.id)
        assert waited.exit_status == 7, f"exit status {waited.exit_status}, expected 7"
        state = kit.service.state(api.StateRequest(id=box.id))
        assert (state.status, state.exit_status) == (task_types.STOPPED, 7)
        deleted = kit.service.delete(api.DeleteRequest(id=box.id))
        assert deleted.exit_status == 7
        assert MARKER in box.output(), "the program's output did not reach stdout"
        topics = [t for t, ident in kit.events.topics if ident == box.id]
        assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    finally:
        box.close()


def kill_ends_a_running_process_with_128_plus_signal(kit: _Kit) -> None:
    box = kit.container("sleep")
    try:
        box.create()
        kit.service.start(api.StartRequest(id=box.id))
        kit.service.kill(api.KillRequest(id=box.id, signal=signal.SIGKILL))
        assert _wait(kit, box.id).exit_status == 128 + signal.SIGKILL
        try:
            kit.service.kill(api.KillRequest(id=box.id, signal=signal.SIGKILL))
        except NotFound:
            pass
        else:
            raise AssertionError("Kill of a finished process must be NotFound")
        kit.service.delete(api.DeleteRequest(id=box.id))
    finally:
        box.close()


def delete_works_before_start(kit: _Kit) -> None:
    box = kit.container("sleep")
    try:
        box.create()
        kit.service.delete(api.DeleteRequest(id=box.id))
        try:
            kit.service.state(api.StateRequest(id=box.id))
        except NotFound:
            return
        raise AssertionError("the task is still known after Delete")
    finally:
        box.close()


def stdin_reaches_the_process(kit: _Kit) -> None:
    box = kit.container("echo-line", stdin=True)
    try:
        box.create()
        kit.service.start(api.StartRequest(id=box.id))
        assert box.stdin is not None
        os.write(box.stdin, b"kit line\n")
        assert _wait(kit, box.id).exit_status == 0
        assert "got: kit line" in box.output()
        kit.service.delete(api.DeleteRequest(id=box.id))
    finally:
        box.close()


def pids_list_the_running_init(kit: _Kit) -> None:
    box = kit.container("sleep")
    try:
        pid = box.create()
        kit.service.start(api.StartRequest(id=box.id))
        pids = [p.pid for p in kit.service.pids(api.PidsRequest(id=box.id)).processes]
        assert pids, "Pids of a live task must not be empty (containerd 2.x deletes it)"
        assert not pid or pid in pids, f"init pid {pid} not in {pids}"
        _kill_and_delete(kit, box.id)
    finally:
        box.close()


def exec_runs_beside_the_init(kit: _Kit) -> None:
    if Cap.EXEC not in kit.backend.capabilities:
        return
    box = kit.container("sleep")
    try:
        box.create()
        kit.service.start(api.StartRequest(id=box.id))
        spec = any_pb2.Any(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
            value=json.dumps(kit.programs.process("exit", 3)).encode(),
        )
        kit.service.exec(api.ExecProcessRequest(id=box.id, exec_id="e1", spec=spec))
        kit.service.start(api.StartRequest(id=box.id, exec_id="e1"))
        assert _wait(kit, box.id, "e1").exit_status == 3
        kit.service.delete(api.DeleteRequest(id=box.id, exec_id="e1"))
        _kill_and_delete(kit, box.id)
    finally:
        box.close()


def undeclared_capabilities_are_unimplemented_naming_the_backend(kit: _Kit) -> None:
    calls: dict[Cap, Callable[[str], object]] = {
        Cap.EXEC: lambda cid: kit.service.exec(
            api.ExecProcessRequest(id=cid, exec_id="x", spec=any_pb2.Any(value=b"{}"))
        ),
        Cap.PAUSE: lambda cid: kit.service.pause(api.PauseRequest(id=cid)),
        Cap.UPDATE: lambda cid: kit.service.update(api.UpdateTaskRequest(id=cid)),
        Cap.CHECKPOINT: lambda cid: kit.service.checkpoint(api.CheckpointTaskRequest(id=cid)),
    }
    missing = {cap: call for cap, call in calls.items() if cap not in kit.backend.capabilities}
    if not missing:
        return
    box = kit.container("sleep")
    try:
        box.create()
        kit.service.start(api.StartRequest(id=box.id))
        for cap, call in missing.items():
            try:
                call(box.id)
            except Unimplemented as e:
                assert kit.backend.name in str(e), f"{cap.value}: {e} does not name the backend"
            else:
                raise AssertionError(f"{cap.value} is not declared but did not fail")
        _kill_and_delete(kit, box.id)
    finally:
        box.close()


CHECKS: list[Callable[[_Kit], None]] = [
    lifecycle_reports_exit_status_output_and_events,
    kill_ends_a_running_process_with_128_plus_signal,
    delete_works_before_start,
    stdin_reaches_the_process,
    pids_list_the_running_init,
    exec_runs_beside_the_init,
    undeclared_capabilities_are_unimplemented_naming_the_backend,
]


# -- helpers ---------------------------------------------------------------------------------------


def _wait(kit: _Kit, cid: str, exec_id: str = "") -> Any:
    deadline = time.monotonic() + TIMEOUT
    request = api.WaitRequest(id=cid, exec_id=exec_id)
    process = kit.service._process(kit.service._task(cid), exec_id)
    assert process.exited.wait(max(0.0, deadline - time.monotonic())), (
        f"{exec_id or cid} did not exit within {TIMEOUT} s"
    )
    return kit.service.wait(request)


def _kill_and_delete(kit: _Kit, cid: str) -> None:
    kit.service.kill(api.KillRequest(id=cid, signal=signal.SIGKILL, all=True))
    _wait(kit, cid)
    kit.service.delete(api.DeleteRequest(id=cid))


def _runtime_options(toml: str) -> bytes:
    from shim_framework.api.runtimeoptions.v1 import api_pb2

    return api_pb2.Options(config_body=toml.encode()).SerializeToString()
