"""The runc backend: containers run by runc, or by any OCI runtime with runc's command line.

It drives the runtime the way containerd-shim-runc-v2 does (spec §6.2): `create`, `start`,
`kill`, `delete`, `exec --detach` with a process.json, `pause`/`resume`, `update`, `ps`,
`checkpoint` and a deferred `restore`. The runtime forks the container's init (and each exec
process) and exits; the process is re-parented to the shim, a child subreaper, and the
framework's reaper reports its exit. The backend never waits for a container process.

Configuration, `[backends.runc]` (a `containerd.runc.v1.Options` fills the same keys):

    binary = "runc"                # the OCI runtime, on PATH or a path; "crun" works too
    root = "/run/containerd/runc"  # state root; the runtime gets --root <root>/<namespace>
    systemd_cgroup = false         # --systemd-cgroup (cgroupsPath is "slice:prefix:name")
    no_pivot_root = false          # create/restore --no-pivot (a rootfs on a ramdisk)
    no_new_keyring = false         # create --no-new-keyring
    criu_path = ""                 # the criu binary (runc --criu); default: criu on PATH
    criu_image_path = ""           # checkpoint images go here when a Checkpoint names no path
    criu_work_path = ""            # criu's work dir (its logs); default <bundle>/criu-work

Files in the bundle: the runtime's `log.json`, `init.pid`, `<exec id>.pid`,
`<exec id>.process.json` while `exec` runs, `criu-dump.log` / `criu-restore.log` after a failed
checkpoint / restore.

Resource handling: the framework owns the stdio fds and every pty master returned here.
The backend owns its console sockets (closed once the master arrived) and a pidfd per
started exec process (closed when the exec or its container is deleted), so a signal for
an exec can never reach a later process that reused its pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal as signals
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from backends.runc import criu
from backends.runc.runtime import RuncError, Runtime, Settings, run_plain, unusable
from shim_framework.backend import (
    Backend,
    Cap,
    Container,
    Created,
    ExecProcess,
    PidInfo,
    Probe,
    ProcessIO,
    Started,
)
from shim_framework.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolyshimError,
    Unimplemented,
)

if TYPE_CHECKING:
    from shim_framework.host import Host
    from shim_framework.stdio import ConsoleSocket

log = logging.getLogger("polyshim.backend.runc")

INIT_PID = "init.pid"
CONSOLE_TIMEOUT = 10.0  # the runtime sent the master before it exited; this is slack
CLEANUP_TIMEOUT = 4.0  # the `delete` action has 5 s in all (spec §2.6)


@attrs.define(eq=False)
class _Exec:
    process: dict[str, Any]  # OCI process object, written to <exec id>.process.json
    io: ProcessIO
    pid: int = 0
    pidfd: int | None = None  # None: no pidfds on this kernel, or `gone`
    gone: bool = False  # exited and reaped before we could pin it

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


@attrs.define(eq=False)
class _Record:
    """What the backend keeps per container."""

    bundle: Path
    io: ProcessIO
    pid: int = 0
    restore_from: str = ""  # a checkpoint to restore on Start
    execs: dict[str, _Exec] = attrs.field(factory=dict)


class RuncBackend(Backend):
    name = "runc"
    capabilities = frozenset(
        {Cap.EXEC, Cap.TERMINAL, Cap.PAUSE, Cap.UPDATE, Cap.PIDS, Cap.CHECKPOINT}
    )

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.settings = Settings.from_config(host.config)
        self.runtime = Runtime(self.settings, host.namespace, host.run)
        self._records: dict[str, _Record] = {}
        self._commands: dict[str, bool] = {}  # does the runtime have this command?
        self._lock = threading.Lock()  # guards _records and each record's execs; never held
        # while the runtime runs

    @classmethod
    def probe(cls, config: Mapping[str, Any]) -> Probe:
        try:
            reason = unusable(Settings.from_config(config))
        except InvalidArgument as e:
            reason = str(e)
        return Probe.no(reason) if reason else Probe.yes()

    # -- init process ---------------------------------------------------------------------------

    def create(self, container: Container) -> Created:
        if container.checkpoint:
            criu.require(self.criu)
            self._require_command("restore")
        record = _Record(container.bundle, container.io)
        with self._lock:
            if container.id in self._records:
                raise AlreadyExists(f'container "{container.id}": already exists')
            self._records[container.id] = record
        if container.checkpoint:
            # criu restores and resumes in one step, so the restore waits for Start (as in
            # the ref shim); the pid is 0 until then and Started carries it.
            record.restore_from = container.checkpoint
            return Created(0)
        try:
            record.pid, master = self._create(container)
        except BaseException:
            self._forget(container.id)
            raise
        return Created(record.pid, console_fd=master)

    def _create(self, container: Container) -> tuple[int, int | None]:
        args = ["--bundle", str(container.bundle)]
        if self.settings.no_pivot_root:
            args.append("--no-pivot")
        if self.settings.no_new_keyring:
            args.append("--no-new-keyring")
        return self._launch_init("create", container.id, container.bundle, args, container.io)

    def start(self, container_id: str) -> Started:
        record = self._record(container_id)
        if record.restore_from:
            pid, master = self._restore(container_id, record)
            record.pid, record.restore_from = pid, ""
            return Started(pid, console_fd=master)
        self.runtime("start", container_id, record.bundle, [container_id])
        return Started(record.pid)

    def _restore(self, container_id: str, record: _Record) -> tuple[int, int | None]:
        work = Path(self.settings.criu_work_path or record.bundle / "criu-work")
        args = ["--detach", "--image-path", record.restore_from, "--work-path", str(work)]
        args += ["--no-subreaper", "--bundle", str(record.bundle)]  # the shim is the subreaper
        if self.settings.no_pivot_root:
            args.append("--no-pivot")
        # No --parent-path: runc's restore has none; criu follows the `parent` link that an
        # incremental `checkpoint --parent-path` left in the image directory.
        try:
            return self._launch_init("restore", container_id, record.bundle, args, record.io)
        except RuncError as e:
            raise criu.explain(
                e,
                action="restore",
                criu=self.criu,
                run=self.host.run,
                log=work / "restore.log",
                keep_as=record.bundle / "criu-restore.log",
            ) from e

    def _launch_init(
        self, command: str, container_id: str, bundle: Path, args: list[str], io: ProcessIO
    ) -> tuple[int, int | None]:
        pid_file = bundle / INIT_PID
        args = [*args, "--pid-file", str(pid_file), container_id]
        try:
            return self._launch(command, container_id, bundle, args, io, pid_file)
        except AlreadyExists:
            raise  # another container with this id: not ours to remove
        except BaseException:
            self._remove(container_id, bundle)  # leave nothing half-created behind
            raise

    def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        record = self._record(container_id)
        if exec_id:
            self._kill_exec(container_id, self._exec(record, container_id, exec_id), signal)
            return
        args = ["--all", container_id] if all else [container_id]
        try:
            self.runtime("kill", container_id, record.bundle, [*args, str(signal)])
        except FailedPrecondition as e:  # "container not running", crun's "No such process"
            raise NotFound(f'container "{container_id}": process already finished') from e

    def delete(self, container_id: str, exec_id: str = "") -> None:
        record = self._record(container_id)
        if exec_id:
            execution = self._exec(record, container_id, exec_id)
            with self._lock:
                record.execs.pop(exec_id, None)
            _forget_exec(record.bundle, exec_id, execution)
            return
        # NotFound: gone already (restore never ran, or a checkpoint with exit removed it)
        with contextlib.suppress(NotFound):
            self.runtime("delete", container_id, record.bundle, [container_id])
        self._forget(container_id)
        for exec_id, execution in record.execs.items():
            _forget_exec(record.bundle, exec_id, execution)
        (record.bundle / INIT_PID).unlink(missing_ok=True)

    @classmethod
    def cleanup(
        cls, bundle: Path, container_id: str, namespace: str, config: Mapping[str, Any]
    ) -> None:
        # The `delete` action is a fresh process without a reaper: nothing else waits for
        # its children, so subprocess's own waitpid is safe here (and only here).
        runtime = Runtime(Settings.from_config(config), namespace, run_plain)
        with contextlib.suppress(NotFound):  # usually deleted through the task API already
            args = ["--force", container_id]
            runtime("delete", container_id, bundle, args, timeout=CLEANUP_TIMEOUT)

    # -- exec processes -------------------------------------------------------------------------

    def exec(self, process: ExecProcess) -> None:
        record = self._record(process.container_id)
        if not process.exec_id or "/" in process.exec_id or process.exec_id.startswith("."):
            # it names files in the bundle
            raise InvalidArgument(f'exec "{process.exec_id}": not a valid exec id')
        spec = {**process.process, "terminal": process.io.terminal}
        with self._lock:
            if process.exec_id in record.execs:
                raise AlreadyExists(f'exec "{process.exec_id}": already exists')
            record.execs[process.exec_id] = _Exec(spec, process.io)

    def start_exec(self, container_id: str, exec_id: str) -> Started:
        record = self._record(container_id)
        execution = self._exec(record, container_id, exec_id)
        if execution.pid:
            raise FailedPrecondition(f'exec "{exec_id}": already started')
        spec_file = record.bundle / f"{exec_id}.process.json"
        pid_file = record.bundle / f"{exec_id}.pid"
        _write_private(spec_file, json.dumps(execution.process).encode())
        try:
            args = ["--process", str(spec_file), "--detach", "--pid-file", str(pid_file)]
            pid, master = self._launch(
                "exec", container_id, record.bundle, [*args, container_id], execution.io, pid_file
            )
        finally:
            spec_file.unlink(missing_ok=True)  # read by the runtime before it returned
        execution.pid = pid
        try:
            execution.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            execution.gone = True  # a quick one: the reaper has its exit, the pid is free
        except OSError:
            pass  # Linux < 5.3: plain kill(2)
        return Started(pid, console_fd=master)

    def _kill_exec(self, container_id: str, execution: _Exec, signal: int) -> None:
        if not execution.pid:
            raise FailedPrecondition(f'exec of container "{container_id}": not started yet')
        if execution.gone:
            raise NotFound(
                f'exec pid {execution.pid} of container "{container_id}": process already finished'
            )
        try:
            if execution.pidfd is not None:
                signals.pidfd_send_signal(execution.pidfd, signal)
            else:
                os.kill(execution.pid, signal)
        except ProcessLookupError as e:
            raise NotFound(
                f'exec pid {execution.pid} of container "{container_id}": process already finished'
            ) from e

    # -- the rest -------------------------------------------------------------------------------

    def pause(self, container_id: str) -> None:
        self.runtime("pause", container_id, self._record(container_id).bundle, [container_id])

    def resume(self, container_id: str) -> None:
        self.runtime("resume", container_id, self._record(container_id).bundle, [container_id])

    def update(self, container_id: str, resources: Mapping[str, Any]) -> None:
        record = self._record(container_id)
        body = json.dumps(resources).encode()
        args = ["--resources", "-", container_id]
        self.runtime("update", container_id, record.bundle, args, input=body)

    def pids(self, container_id: str) -> Sequence[PidInfo]:
        record = self._record(container_id)
        if record.restore_from:
            return []  # nothing runs until Start restores it
        try:
            args = ["--format", "json", container_id]
            result = self.runtime("ps", container_id, record.bundle, args)
            pids = json.loads(result.stdout or b"null") or []  # runc: null when stopped
        except RuncError:
            if self._status(container_id, record) == "stopped":
                return []  # crun 1.8 crashes listing a stopped container
            raise
        with self._lock:
            exec_ids = {e.pid: exec_id for exec_id, e in record.execs.items() if e.pid}
        return [PidInfo(pid, exec_ids.get(pid, "")) for pid in pids]

    def checkpoint(self, container_id: str, path: str, options: Mapping[str, Any]) -> None:
        record = self._record(container_id)
        criu.require(self.criu)
        self._require_command("checkpoint")
        image = path or options.get("image_path") or self.settings.criu_image_path
        if not image:
            raise InvalidArgument(f'container "{container_id}": checkpoint needs an image path')
        # ref: a work dir someone asked for is kept; the default one is removed afterwards
        work = options.get("work_path") or self.settings.criu_work_path
        keep_work = bool(work)
        work = work or str(record.bundle / "criu-work")
        args = ["--image-path", str(image), "--work-path", work, *criu.checkpoint_flags(options)]
        try:
            self.runtime(
                "checkpoint", container_id, record.bundle, [*args, container_id], criu=True
            )
        except RuncError as e:
            raise criu.explain(
                e,
                action="checkpoint",
                criu=self.criu,
                run=self.host.run,
                log=Path(work) / "dump.log",
                keep_as=record.bundle / "criu-dump.log",
            ) from e
        finally:
            if not keep_work:
                shutil.rmtree(work, ignore_errors=True)

    @property
    def criu(self) -> str:
        return self.settings.criu_path or "criu"

    def _require_command(self, command: str) -> None:
        """Unimplemented unless the runtime has *command* (Debian's crun has no checkpoint)."""
        with self._lock:
            known = self._commands.get(command)
        if known is None:
            known = self.host.run([self.settings.binary, command, "--help"]).status == 0
            with self._lock:
                self._commands[command] = known
        if not known:
            name = self.runtime.name
            raise Unimplemented(
                f"backend runc: {name} cannot {command} (it has no `{command}` command); "
                f"use runc, or a build of {name} with CRIU"
            )

    # -- helpers --------------------------------------------------------------------------------

    def _record(self, container_id: str) -> _Record:
        with self._lock:
            record = self._records.get(container_id)
        if record is None:
            raise NotFound(f'container "{container_id}": not created by backend runc')
        return record

    def _exec(self, record: _Record, container_id: str, exec_id: str) -> _Exec:
        with self._lock:
            execution = record.execs.get(exec_id)
        if execution is None:
            raise NotFound(f'exec "{exec_id}" of container "{container_id}": not found')
        return execution

    def _forget(self, container_id: str) -> None:
        with self._lock:
            self._records.pop(container_id, None)

    def _launch(
        self,
        command: str,
        container_id: str,
        bundle: Path,
        args: list[str],
        io: ProcessIO,
        pid_file: Path,
    ) -> tuple[int, int | None]:
        """Run a command that leaves a process behind (create, restore, exec --detach).

        The runtime hands its fds 0-2 to the process, so the process's stdio become the
        runtime's; for a terminal the runtime sends the pty master to a console socket."""
        with _console(io.terminal) as console, _stdio(io) as fds:
            if console is not None:
                args = ["--console-socket", str(console.path), *args]
            criu = command == "restore"
            self.runtime(command, container_id, bundle, args, fds=fds, criu=criu)
            master = console.receive(CONSOLE_TIMEOUT) if console is not None else None
        try:
            return _read_pid(pid_file, f'container "{container_id}": {command}'), master
        except BaseException:
            if master is not None:
                os.close(master)
            raise

    def _remove(self, container_id: str, bundle: Path) -> None:
        try:
            self.runtime("delete", container_id, bundle, ["--force", container_id])
        except NotFound:
            pass
        except PolyshimError as e:
            log.warning(
                "container %s: cannot remove what a failed create left: %s", container_id, e
            )
        (bundle / INIT_PID).unlink(missing_ok=True)

    def _status(self, container_id: str, record: _Record) -> str:
        try:
            result = self.runtime("state", container_id, record.bundle, [container_id])
            return str(json.loads(result.stdout or b"{}").get("status", ""))
        except (PolyshimError, ValueError):
            return ""


@contextlib.contextmanager
def _console(terminal: bool) -> Iterator[ConsoleSocket | None]:
    if not terminal:
        yield None
        return
    from shim_framework.stdio import ConsoleSocket  # only terminals need it

    socket = ConsoleSocket()
    try:
        yield socket
    finally:
        socket.close()


@contextlib.contextmanager
def _stdio(io: ProcessIO) -> Iterator[dict[int, int]]:
    """The process's fds as the runtime's 0, 1, 2; /dev/null where it has none."""
    null = -1
    fds: dict[int, int] = {}
    try:
        for target, fd in enumerate((io.stdin, io.stdout, io.stderr)):
            if fd is None:
                if null < 0:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                fd = null
            fds[target] = fd
        yield fds
    finally:
        if null >= 0:
            os.close(null)


def _read_pid(pid_file: Path, context: str) -> int:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError) as e:
        raise RuncError(f"{context}: no pid in {pid_file}: {e}") from e


def _forget_exec(bundle: Path, exec_id: str, execution: _Exec) -> None:
    execution.close()
    (bundle / f"{exec_id}.pid").unlink(missing_ok=True)
    (bundle / f"{exec_id}.process.json").unlink(missing_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
