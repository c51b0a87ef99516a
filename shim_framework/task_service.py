"""containerd's task API, once, for every backend.

Theory of operation
-------------------
`TaskService` holds the shim's tasks (one per container; several when
containers are grouped into one shim) and answers the 17 RPCs of
`containerd.task.v2.Task` / `v3.Task` with the reference shim's semantics and
error codes. Each method takes the request message and the call context and
returns the response message; the ttrpc binding does the rest.

The backend does the isolation; everything else happens here, the same way
for every backend: the process table and its states (`process.py`), stdio,
rootfs mounts, backend selection and policy, events, stats, OOM watching.
A call the backend did not declare a capability for is answered
UNIMPLEMENTED naming the backend, without calling it.

How exits flow: the reaper reports every child exit to `on_exit` (a
backend without host pids calls `Host.process_exited` instead). An exit
whose pid is not known yet (the process died before its Create or Start
returned) is parked in `_unclaimed` and claimed when the pid is registered,
if it happened after the process was launched. While a Start is in
progress the exit is held, so `/tasks/start` always precedes `/tasks/exit`.
An init that exits while exec processes still run waits for them, so their
exits are published first. `Process.record_exit` accepts one exit per
process, so each exit reaches waiters and `/tasks/exit` exactly once.

Locking: `_lock` guards the tables and is never held while a backend or
stdio call runs; each task's `op_lock` serialises that task's state changes
(start, kill, delete, pause, ...) so two of them never interleave.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from shim_framework import bootstrap, mounts, selection
from shim_framework import config as runtime_config
from shim_framework.api.events import task_pb2 as events
from shim_framework.api.runc.options import oci_pb2
from shim_framework.api.task.v2 import shim_pb2 as api
from shim_framework.api.types import mount_pb2
from shim_framework.backend import Backend, Cap, Container, ExecProcess, Mount
from shim_framework.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolyshimError,
    Unimplemented,
)
from shim_framework.events import Publisher
from shim_framework.host import Host
from shim_framework.process import Process, Status
from shim_framework.reaper import Exit, Reaper
from shim_framework.registry import Registry
from shim_framework.stdio import ProcessStdio
from shim_framework.ttrpc.server import CallContext

if TYPE_CHECKING:
    from shim_framework.cgroups import Cgroup
    from shim_framework.oom import OomWatcher

log = logging.getLogger("polyshim.task")

DRAIN_TIMEOUT = 10.0  # Delete waits this long for output to reach the client (ref: 10 s)
EXEC_EXIT_GRACE = 10.0  # an init's exit waits at most this long for its execs' exits
UNCLAIMED_LIMIT = 4096
UNKNOWN_EXIT = 255  # containerd's status for a process whose real exit is unknowable
# Go's zero time: what the reference shim sends for "has not exited" (1.6 reads an
# absent timestamp as year 1, 2.x as 1970; this value means the same to both).
NOT_EXITED = timestamp_pb2.Timestamp(seconds=-62135596800)
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


@attrs.define(eq=False)
class Task:
    id: str
    bundle: Path
    spec: dict[str, Any]
    backend: Backend
    init: Process
    rootfs: Path
    mounted: bool  # we mounted the rootfs and unmount it on Delete
    execs: dict[str, Process] = attrs.field(factory=dict)
    op_lock: threading.Lock = attrs.field(factory=threading.Lock)
    init_exit_held: tuple[int, float] | None = None  # waiting for running execs

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def private_pid_namespace(self) -> bool:
        namespaces = (self.spec.get("linux") or {}).get("namespaces") or []
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)

    def require(self, cap: Cap, what: str) -> None:
        require(self.backend, cap, what)


def require(backend: Backend, cap: Cap, what: str) -> None:
    """Unimplemented, naming the backend and its reason, unless it declared *cap*."""
    # runtime-v2 README "Unsupported rpcs": MUST return ErrNotImplemented
    if cap not in backend.capabilities:
        reason = backend.unsupported(cap)
        raise Unimplemented(
            f"backend {backend.name} does not support {what}" + (f": {reason}" if reason else "")
        )


class TaskService:
    """The task API over a process table; one instance per shim process."""

    def __init__(
        self,
        *,
        namespace: str,
        publisher: Publisher,
        reaper: Reaper,
        registry: Registry | None = None,
        oom: OomWatcher | None = None,  # default: made on the first watch
        state_dir: Path | None = None,
        on_shutdown: Callable[[], None] | None = None,
        grpc_address: str = "",
    ) -> None:
        self.namespace = namespace
        self.grpc_address = grpc_address
        self.publisher = publisher
        self.reaper = reaper
        self.registry = registry or Registry()
        self._oom = oom
        self.state_dir = state_dir or Path("/run/polyshim")
        self.on_shutdown = on_shutdown
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._creating: set[str] = set()
        self._by_pid: dict[int, Process] = {}
        self._unclaimed: collections.OrderedDict[int, Exit] = collections.OrderedDict()
        self._backends: dict[tuple[str, str], Backend] = {}
        self._shim_cgroup: Cgroup | None = None

    # -- lookups --------------------------------------------------------------

    def _task(self, container_id: str) -> Task:
        with self._lock:
            task = self._tasks.get(container_id)
        if task is None:
            raise NotFound(f'task "{container_id}": not found')
        return task

    def _process(self, task: Task, exec_id: str) -> Process:
        if not exec_id:
            return task.init
        with self._lock:
            process = task.execs.get(exec_id)
        if process is None:
            raise NotFound(f'exec "{exec_id}" in task "{task.id}": not found')
        return process

    def task_count(self) -> int:
        with self._lock:
            return len(self._tasks) + len(self._creating)

    # -- Create ------------------------------------------------------------------

    def create(self, req: api.CreateTaskRequest, ctx: CallContext | None = None) -> Any:
        if not req.id:
            raise InvalidArgument("create: the task id is empty")
        with self._lock:
            if req.id in self._tasks or req.id in self._creating:
                raise AlreadyExists(f'task "{req.id}": already exists')
            self._creating.add(req.id)
        try:
            return self._create(req)
        finally:
            with self._lock:
                self._creating.discard(req.id)

    def _create(self, req: api.CreateTaskRequest) -> Any:
        began = time.monotonic()
        bundle = Path(req.bundle)
        spec = read_spec(bundle)
        options = req.options if req.HasField("options") else None
        config = runtime_config.load(options)
        rootfs_mounts = [Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs]
        rootfs = bundle / "rootfs"
        stdio: ProcessStdio | None = None
        mounted = False
        try:
            if rootfs_mounts:
                mounts.mount_all(rootfs_mounts, rootfs)
                mounted = True
            root = check_rootfs(bundle, spec)
            choice = selection.choose(spec, root, config, self.registry)
            backend = self._backend(choice.name, config)
            if Cap.RAW_MOUNTS in backend.capabilities and mounted:
                mounts.unmount_all(rootfs)
                mounted = False
            if req.terminal:
                require(backend, Cap.TERMINAL, "terminals")
            if req.checkpoint:
                require(backend, Cap.CHECKPOINT, "checkpoints")
            stdio = self._open_stdio(req, req.id)
            container = Container(
                id=req.id,
                namespace=self.namespace,
                bundle=bundle,
                spec=spec,
                rootfs=root,
                io=stdio.io,
                mounts=tuple(rootfs_mounts),
                checkpoint=req.checkpoint,
                parent_checkpoint=req.parent_checkpoint,
            )
            launched_at = time.time()
            prepared = time.monotonic()
            created = backend.create(container)
            if created.console_fd is not None:
                stdio.attach_console(created.console_fd)
        except BaseException:
            if stdio is not None:
                stdio.close()
            if mounted:
                mounts.unmount_all(rootfs)
            raise
        log.info(
            "created task %s with backend %s (%s) in %.0f ms, %.0f ms of them in the backend",
            req.id, choice.name, choice.rule, (time.monotonic() - began) * 1000,
            (time.monotonic() - prepared) * 1000,
        )  # fmt: skip
        init = Process(req.id, "", stdio, pid=created.pid)
        task = Task(req.id, bundle, spec, backend, init, rootfs, mounted)
        with self._lock:
            self._tasks[req.id] = task
        self._claim(init, launched_at)
        state = {"backend": choice.name, "config": config.to_dict(), "pid": created.pid}
        bootstrap.write_state(str(bundle), state)
        self.publisher.publish(
            events.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=[
                    mount_pb2.Mount(
                        type=m.type, source=m.source, target=m.target, options=m.options
                    )
                    for m in req.rootfs
                ],
                io=events.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                checkpoint=req.checkpoint,
                pid=created.pid,
            )
        )
        return api.CreateTaskResponse(pid=created.pid)

    def _open_stdio(
        self, req: api.CreateTaskRequest | api.ExecProcessRequest, process_id: str
    ) -> ProcessStdio:
        return ProcessStdio.open(
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
            terminal=req.terminal,
            process_id=process_id,
            namespace=self.namespace,
            reaper=self.reaper,
        )

    def _backend(self, name: str, config: runtime_config.RuntimeConfig) -> Backend:
        table = config.backend_config(name)
        key = (name, json.dumps(table, sort_keys=True, default=str))
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                cls = self.registry.load(name)
                host = Host(
                    namespace=self.namespace,
                    config=table,
                    reaper=self.reaper,
                    state_dir=self.state_dir / name,
                    process_exited=self.process_exited,
                    oom=self._on_oom,
                    grpc_address=self.grpc_address,
                )
                backend = self._backends[key] = cls(host)
        return backend

    # -- Start, Exec -------------------------------------------------------------------

    def start(self, req: api.StartRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        process = self._process(task, req.exec_id)
        with task.op_lock:
            if process.status is not Status.CREATED:
                raise FailedPrecondition(
                    f'process "{process.id}": cannot start a {process.status.name.lower()} process'
                )
            if not process.is_init and task.init.exited.is_set():
                raise FailedPrecondition(
                    f'exec "{process.exec_id}": cannot start it, task "{task.id}" has exited'
                )
            with self._lock:
                process.starting = True
            try:
                launched_at = time.time()
                if process.is_init:
                    started = task.backend.start(task.id)
                else:
                    started = task.backend.start_exec(task.id, process.exec_id)
                    if started.console_fd is not None:
                        process.stdio.attach_console(started.console_fd)
                if started.pid and started.pid != process.pid:  # an exec, or a restore
                    process.pid = started.pid
                    self._claim(process, launched_at)
                process.move("start")
                process.stdio.after_start()
            except BaseException:
                self._release_held_exit(process)
                if not process.is_init:
                    self._exec_never_started(process)
                raise
        if process.is_init:
            self.publisher.publish(events.TaskStart(container_id=task.id, pid=process.pid))
            self._watch_oom(task)
        else:
            self.publisher.publish(
                events.TaskExecStarted(
                    container_id=task.id, exec_id=process.exec_id, pid=process.pid
                )
            )
        self._release_held_exit(process)
        return api.StartResponse(pid=process.pid)

    def _exec_never_started(self, process: Process) -> None:
        """A failed exec start: its clients must see EOF and its Wait must return (ref: the
        runc shim unblocks both), or `ctr task exec` hangs on the output it waits for."""
        with self._lock:
            recorded = not process.exited.is_set() and process.record_exit(UNKNOWN_EXIT)
        if recorded:
            process.stdio.close()

    def exec(self, req: api.ExecProcessRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        task.require(Cap.EXEC, "exec")
        if not req.exec_id:
            raise InvalidArgument(f'exec in task "{task.id}": the exec id is empty')
        process_spec = decode_json_any(req.spec, "exec process spec")
        process_spec["terminal"] = req.terminal
        if req.terminal:
            task.require(Cap.TERMINAL, "terminals")
        with task.op_lock:
            if task.init.status is not Status.RUNNING:
                raise FailedPrecondition(
                    f'exec "{req.exec_id}": task "{task.id}" is '
                    f"{task.init.status.name.lower()}, not running"
                )
            with self._lock:
                if req.exec_id in task.execs:
                    raise AlreadyExists(f'exec "{req.exec_id}" in task "{task.id}": already exists')
            stdio = self._open_stdio(req, req.exec_id)
            try:
                task.backend.exec(ExecProcess(task.id, req.exec_id, process_spec, stdio.io))
            except BaseException:
                stdio.close()
                raise
            with self._lock:
                task.execs[req.exec_id] = Process(task.id, req.exec_id, stdio)
        self.publisher.publish(events.TaskExecAdded(container_id=task.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    # -- exits ------------------------------------------------------------------------

    def on_exit(self, exit: Exit) -> None:
        """The reaper's callback for every exit it does not own itself."""
        with self._lock:
            process = self._by_pid.pop(exit.pid, None)
            if process is None:
                self._unclaimed[exit.pid] = exit
                while len(self._unclaimed) > UNCLAIMED_LIMIT:
                    self._unclaimed.popitem(last=False)
                return
            if process.starting:
                process.held_exit = (exit.status, exit.exited_at)
                return
        self._exited(process, exit.status, exit.exited_at)

    def process_exited(self, container_id: str, exec_id: str, status: int) -> None:
        """For backends without host pids (Host.process_exited)."""
        try:
            process = self._process(self._task(container_id), exec_id)
        except NotFound:
            log.warning("exit of unknown process %s/%s ignored", container_id, exec_id)
            return
        with self._lock:
            if process.starting:
                process.held_exit = (status, time.time())
                return
        self._exited(process, status, time.time())

    def _claim(self, process: Process, launched_at: float) -> None:
        """Register the process's pid; take an exit that arrived before we knew it."""
        if not process.pid:
            return
        with self._lock:
            early = self._unclaimed.pop(process.pid, None)
            if early is None or early.exited_at < launched_at:  # none, or an older owner's
                self._by_pid[process.pid] = process
                return
            if process.starting:
                process.held_exit = (early.status, early.exited_at)
                return
        self._exited(process, early.status, early.exited_at)

    def _release_held_exit(self, process: Process) -> None:
        with self._lock:
            process.starting = False
            held, process.held_exit = process.held_exit, None
        if held is not None:
            self._exited(process, *held)

    def _exited(self, process: Process, status: int, exited_at: float) -> None:
        with self._lock:
            task = self._tasks.get(process.container_id)
        if task is None:
            return
        if process.is_init:
            running = self._running_execs(task)
            if running:
                with self._lock:
                    task.init_exit_held = (status, exited_at)
                if not task.private_pid_namespace:
                    # No pid namespace: the kernel will not kill the execs for us (ref does this).
                    self._kill_quietly(task, "", 9, all=True)
                timer = threading.Timer(EXEC_EXIT_GRACE, self._finish_held_init, (task, True))
                timer.daemon = True
                timer.start()
                return
            self._finish(task, process, status, exited_at)
            return
        self._finish(task, process, status, exited_at)
        self._finish_held_init(task)

    def _running_execs(self, task: Task) -> list[Process]:
        with self._lock:
            return [p for p in task.execs.values() if p.pid and not p.exited.is_set()]

    def _finish_held_init(self, task: Task, timed_out: bool = False) -> None:
        with self._lock:
            held = task.init_exit_held
            if held is None or (self._running_execs_locked(task) and not timed_out):
                return
            task.init_exit_held = None
        self._finish(task, task.init, *held)

    def _running_execs_locked(self, task: Task) -> bool:
        return any(p.pid and not p.exited.is_set() for p in task.execs.values())

    def _finish(self, task: Task, process: Process, status: int, exited_at: float) -> None:
        with self._lock:
            recorded = process.record_exit(status, exited_at)
        if not recorded:
            return
        log.info("process %s of task %s exited with status %d", process.id, task.id, status)
        self.publisher.publish(
            events.TaskExit(
                container_id=task.id,
                id=process.id,
                pid=process.pid,
                exit_status=status,
                exited_at=timestamp(exited_at),
            )
        )

    # -- Wait, State, Pids -------------------------------------------------------------------

    def wait(self, req: api.WaitRequest, ctx: CallContext | None = None) -> Any:
        process = self._process(self._task(req.id), req.exec_id)
        # Wait may block for the life of the container; wake now and then to notice a
        # caller that went away (its connection closed).
        while not process.exited.wait(1.0):
            if ctx is not None and ctx.done.is_set():
                raise FailedPrecondition(f'wait for "{process.id}": the caller went away')
        return api.WaitResponse(
            exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def state(self, req: api.StateRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        process = self._process(task, req.exec_id)
        stdio = process.stdio
        return api.StateResponse(
            id=process.id,
            bundle=str(task.bundle),
            pid=process.pid,
            status=process.status.value,
            stdin=stdio.stdin,
            stdout=stdio.stdout,
            stderr=stdio.stderr,
            terminal=stdio.terminal,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at),
        )

    def pids(self, req: api.PidsRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        with self._lock:
            exec_ids = {p.pid: p.exec_id for p in task.execs.values() if p.pid}
        if Cap.PIDS in task.backend.capabilities:
            found = [
                (info.pid, info.exec_id or exec_ids.get(info.pid, ""))
                for info in task.backend.pids(task.id)
            ]
        else:
            found = [(pid, exec_ids.get(pid, "")) for pid in self._cgroup_procs(task)]
        response = api.PidsResponse()
        for pid, exec_id in found:
            info = response.processes.add(pid=pid)
            if exec_id:
                details = oci_pb2.ProcessDetails(exec_id=exec_id)
                info.info.CopyFrom(
                    any_pb2.Any(
                        type_url=details.DESCRIPTOR.full_name, value=details.SerializeToString()
                    )
                )
        return response

    def _cgroup_procs(self, task: Task) -> list[int]:
        cgroup = self._container_cgroup(task)
        if cgroup is not None:
            return cgroup.procs()
        with self._lock:  # no cgroup of its own: the processes we know of
            processes = [task.init, *task.execs.values()]
        return [p.pid for p in processes if p.pid and not p.exited.is_set()]

    def _container_cgroup(self, task: Task) -> Cgroup | None:
        """The init's cgroup when it is the container's own (not the shim's)."""
        if not task.init.pid or task.init.exited.is_set():
            return None
        from shim_framework import cgroups  # Stats and OOM only: not on the create path

        try:
            cgroup = cgroups.Cgroup.of_pid(task.init.pid)
        except NotFound:
            return None
        if self._shim_cgroup is None:
            self._shim_cgroup = cgroups.self_cgroup()
        return None if cgroup.is_same_as(self._shim_cgroup) else cgroup

    # -- Kill, Delete -----------------------------------------------------------------------

    def kill(self, req: api.KillRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        process = self._process(task, req.exec_id)
        if process.exited.is_set():
            raise NotFound(f'process "{process.id}": already finished')
        if not process.is_init and process.status is Status.CREATED:
            raise FailedPrecondition(f'exec "{process.exec_id}": not started yet')
        task.backend.kill(task.id, req.exec_id, req.signal, req.all)
        return empty_pb2.Empty()

    def _kill_quietly(self, task: Task, exec_id: str, signal: int, all: bool) -> None:
        try:
            task.backend.kill(task.id, exec_id, signal, all)
        except PolyshimError as e:
            log.debug("kill of %s/%s: %s", task.id, exec_id, e)

    def delete(self, req: api.DeleteRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        if req.exec_id:
            return self._delete_exec(task, self._process(task, req.exec_id))
        with task.op_lock:
            init = task.init
            if init.status not in (Status.CREATED, Status.STOPPED):
                raise FailedPrecondition(
                    f'task "{task.id}": cannot delete a {init.status.name.lower()} process; '
                    "kill it and wait for its exit first"
                )
            task.backend.delete(task.id)
            with self._lock:
                if not init.exited.is_set():  # never started: it dies with the container
                    init.record_exit(128 + 9)
                self._by_pid.pop(init.pid, None)
                execs = list(task.execs.values())
                task.execs.clear()
        for process in [*execs, init]:
            process.stdio.wait_drained(DRAIN_TIMEOUT)
            process.stdio.close()
        if self._oom is not None:
            self._oom.unwatch(task.id)
        if task.mounted:
            mounts.unmount_all(task.rootfs)
        mark_deleted(task.bundle, init.pid)
        with self._lock:
            self._tasks.pop(task.id, None)
        self.publisher.publish(
            events.TaskDelete(
                container_id=task.id,
                pid=init.pid,
                exit_status=init.exit_status,
                exited_at=timestamp(init.exited_at),
            )
        )
        return api.DeleteResponse(
            pid=init.pid, exit_status=init.exit_status, exited_at=timestamp(init.exited_at)
        )

    def _delete_exec(self, task: Task, process: Process) -> Any:
        with task.op_lock:
            if process.status is not Status.STOPPED and process.pid:
                raise FailedPrecondition(
                    f'exec "{process.exec_id}": cannot delete a running process'
                )
            task.backend.delete(task.id, process.exec_id)
            with self._lock:
                task.execs.pop(process.exec_id, None)
                self._by_pid.pop(process.pid, None)
        process.stdio.wait_drained(DRAIN_TIMEOUT)
        process.stdio.close()
        return api.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at),
        )

    # -- Pause, Resume, Update, Checkpoint, Stats -----------------------------------------------

    def pause(self, req: api.PauseRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        task.require(Cap.PAUSE, "pause")
        with task.op_lock:
            task.init.move("pause")
            try:
                task.backend.pause(task.id)
            except BaseException:
                with self._lock:
                    if task.init.status is Status.PAUSING:
                        task.init.move("pause failed")
                raise
            with self._lock:
                if task.init.status is Status.PAUSING:
                    task.init.move("paused")
        self.publisher.publish(events.TaskPaused(container_id=task.id))
        return empty_pb2.Empty()

    def resume(self, req: api.ResumeRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        task.require(Cap.PAUSE, "resume")
        with task.op_lock:
            if task.init.status is not Status.PAUSED:
                raise FailedPrecondition(
                    f"invalid state transition: {task.init.status.name.lower()} => resume"
                )
            task.backend.resume(task.id)
            with self._lock:
                if task.init.status is Status.PAUSED:
                    task.init.move("resume")
        self.publisher.publish(events.TaskResumed(container_id=task.id))
        return empty_pb2.Empty()

    def update(self, req: api.UpdateTaskRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        task.require(Cap.UPDATE, "update")
        resources = decode_json_any(req.resources, "resources")
        with task.op_lock:
            if task.init.status not in (Status.RUNNING, Status.PAUSED):
                raise FailedPrecondition(
                    f'task "{task.id}": cannot update a {task.init.status.name.lower()} task'
                )
            task.backend.update(task.id, resources)
        return empty_pb2.Empty()

    def checkpoint(self, req: api.CheckpointTaskRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        task.require(Cap.CHECKPOINT, "checkpoint")
        options: dict[str, Any] = {}
        if req.options.value:
            from google.protobuf import json_format  # rarely needed; not on the start path

            parsed = oci_pb2.CheckpointOptions.FromString(req.options.value)
            options = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
        with task.op_lock:
            if task.init.status not in (Status.RUNNING, Status.PAUSED):
                raise FailedPrecondition(
                    f'task "{task.id}": cannot checkpoint a {task.init.status.name.lower()} task'
                )
            task.backend.checkpoint(task.id, req.path, options)
        return empty_pb2.Empty()

    def stats(self, req: api.StatsRequest, ctx: CallContext | None = None) -> Any:
        task = self._task(req.id)
        if Cap.STATS in task.backend.capabilities:
            return api.StatsResponse(stats=task.backend.stats(task.id))
        cgroup = self._container_cgroup(task)
        if cgroup is None:
            raise NotFound(f'task "{task.id}": no cgroup to read metrics from')
        return api.StatsResponse(stats=cgroup.metrics())

    # -- stdio -------------------------------------------------------------------------------

    def resize_pty(self, req: api.ResizePtyRequest, ctx: CallContext | None = None) -> Any:
        process = self._process(self._task(req.id), req.exec_id)
        process.stdio.resize(req.width, req.height)
        return empty_pb2.Empty()

    def close_io(self, req: api.CloseIORequest, ctx: CallContext | None = None) -> Any:
        process = self._process(self._task(req.id), req.exec_id)
        if req.stdin:
            process.stdio.close_stdin()
        return empty_pb2.Empty()

    # -- shim ---------------------------------------------------------------------------------

    def connect(self, req: api.ConnectRequest, ctx: CallContext | None = None) -> Any:
        with self._lock:
            task = self._tasks.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=task.init.pid if task else 0)

    def shutdown(self, req: api.ShutdownRequest, ctx: CallContext | None = None) -> Any:
        # ref: a shim that still has tasks stays; the last one out turns off the lights.
        if self.task_count() == 0 and self.on_shutdown is not None:
            self.on_shutdown()
        return empty_pb2.Empty()

    # -- OOM ------------------------------------------------------------------------------------

    def _watch_oom(self, task: Task) -> None:
        """Watch the container's cgroup for OOM kills, off the Start call's critical path."""

        def watch() -> None:
            cgroup = self._container_cgroup(task)
            if cgroup is None:
                return
            try:
                self.oom.watch(task.id, cgroup)
            except (OSError, PolyshimError) as e:
                log.warning("task %s: OOM events unavailable: %s", task.id, e)

        threading.Thread(target=watch, name=f"oom-watch {task.id}", daemon=True).start()

    @property
    def oom(self) -> OomWatcher:
        with self._lock:
            if self._oom is None:
                from shim_framework.oom import OomWatcher

                self._oom = OomWatcher(self._on_oom)
            return self._oom

    def close(self) -> None:
        """Stop background watchers (the shim is exiting)."""
        if self._oom is not None:
            self._oom.close()

    def _on_oom(self, container_id: str) -> None:
        self.publisher.publish(events.TaskOOM(container_id=container_id))


# -- helpers -------------------------------------------------------------------------------------


def timestamp(when: float | None) -> timestamp_pb2.Timestamp:
    if when is None:
        return NOT_EXITED
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(when * 1e9))
    return stamp


def read_spec(bundle: Path) -> dict[str, Any]:
    """The bundle's config.json, or InvalidArgument saying what is wrong with it."""
    if not bundle.is_absolute():
        raise InvalidArgument(f"bundle {bundle}: must be an absolute path")
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_bytes().decode("utf-8", "replace"))  # Go accepts bad UTF-8
    except FileNotFoundError:
        raise InvalidArgument(f"bundle {bundle}: config.json is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"bundle {bundle}: cannot read config.json: {e}") from e
    except json.JSONDecodeError as e:
        raise InvalidArgument(
            f"bundle {bundle}: config.json is not valid JSON ({e}); regenerate the OCI spec"
        ) from e
    except RecursionError as e:
        raise InvalidArgument(
            f"bundle {bundle}: config.json nests too deeply to read; regenerate the OCI spec"
        ) from e
    if not isinstance(spec, dict):
        raise InvalidArgument(f"bundle {bundle}: config.json must hold a JSON object")
    process = spec.get("process")
    if process is not None and not isinstance(process, dict):
        raise InvalidArgument(f"bundle {bundle}: config.json: process must be an object")
    return spec


def check_rootfs(bundle: Path, spec: dict[str, Any]) -> Path:
    """The container's root directory (the spec's root.path, relative to the bundle), which
    must exist."""
    root = (spec.get("root") or {}).get("path") or "rootfs"
    path = bundle / root if not root.startswith("/") else Path(root)
    if not path.is_dir():
        raise InvalidArgument(
            f"bundle {bundle}: root filesystem {path} does not exist; "
            "give the task rootfs mounts or prepare the directory"
        )
    # An empty one is not refused here: a wasm image of raw wasm layers unpacks to an
    # empty snapshot, and a Linux backend reports the missing executable itself.
    return path


def decode_json_any(value: any_pb2.Any, what: str) -> dict[str, Any]:
    """The OCI object in an Any containerd sends: JSON, not protobuf."""
    if not value.value:
        return {}
    try:
        decoded = json.loads(value.value)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidArgument(f"{what} ({value.type_url}): not valid JSON: {e!r}") from e
    if not isinstance(decoded, dict):
        raise InvalidArgument(f"{what} ({value.type_url}): must be a JSON object")
    return decoded


def mark_deleted(bundle: Path, pid: int) -> None:
    """Tell the `delete` action that containerd runs next: nothing is left to clean."""
    try:
        bootstrap.mark_deleted(str(bundle), pid)
    except OSError as e:
        log.debug("bundle %s: cannot mark deleted: %s", bundle, e)
