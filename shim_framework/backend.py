"""The backend contract: what an isolation driver implements, and what it is given.

The framework owns everything that is the same for every isolation mechanism:
the task API, the process table and its states, exit recording, events,
stdio, rootfs mounts, selection and policy. A backend owns only isolation:
turning a container's OCI spec into a process that runs under its mechanism,
and starting, signalling and removing that process.

Required: `probe()` (class method), `create`, `start`, `kill`, `delete`.
Optional behaviour is announced in `capabilities`; the framework answers
containerd's "not implemented" for anything undeclared, naming the backend,
and never calls the method. A minimal backend fits on a screen:

    class EchoBackend(Backend):
        name = "echo"

        @classmethod
        def probe(cls, config): return Probe.yes()

        def create(self, container):
            pid = self.host.spawn(["/bin/echo", *container.args], container.io)
            self.pids[container.id] = pid
            return Created(pid)
        ...

Exits: a backend whose processes are host processes returns their pids
(`Created.pid`, `Started.pid`); the framework's reaper sees them exit and
records the status. A backend without host pids (a VM, a jail on another
kernel) calls `host.process_exited(container_id, exec_id, status)` instead.
Either way the framework, not the backend, records status and time, and
publishes `/tasks/exit` once.

Stdio is the framework's: a backend receives a `ProcessIO` whose fds the
process must get as its fds 0, 1 and 2 (the framework wires FIFOs, files and
logging binaries to them, closes stdin on CloseIO and drains output). For a
terminal process the backend returns the pty master in `console_fd`; the
framework copies to and from it and resizes it. That is why ResizePty and
CloseIO are not capabilities: they work on fds the framework holds.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from shim_framework.host import Host


class Cap(enum.Enum):
    """Optional behaviour a backend declares."""

    EXEC = "exec"  # extra processes in a running container (Exec + Start)
    TERMINAL = "terminal"  # processes with a pty (process.terminal = true)
    PAUSE = "pause"  # Pause and Resume
    UPDATE = "update"  # resource limits of a running container
    PIDS = "pids"  # every pid in the container (else: the framework lists its own)
    STATS = "stats"  # cgroup metrics (else: the framework reads the init's cgroup)
    CHECKPOINT = "checkpoint"  # Checkpoint, and Create from a checkpoint
    RAW_MOUNTS = "raw-mounts"  # give me the rootfs mount list; do not mount it


@attrs.frozen
class Probe:
    """Whether this host can run a backend (or a snapshotd driver), and why not."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Probe:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Probe:
        return cls(False, reason)


@attrs.frozen
class Mount:
    """One `containerd.types.Mount` of the rootfs."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@attrs.frozen
class ProcessIO:
    """The process's side of its stdio. The framework owns and closes these fds.

    `stdin`, `stdout`, `stderr` are fds to install as 0, 1, 2 (None: /dev/null).
    With `terminal` set they are None and the backend must create a pty and
    return its master in `Created.console_fd` / `Started.console_fd`.
    """

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    terminal: bool = False


@attrs.frozen
class Container:
    """The narrow view of one container a backend gets at create time."""

    id: str
    namespace: str
    bundle: Path
    spec: Mapping[str, Any]  # config.json, parsed
    rootfs: Path  # mounted (unless RAW_MOUNTS) and ready
    io: ProcessIO
    mounts: tuple[Mount, ...] = ()  # the raw list, for RAW_MOUNTS backends
    checkpoint: str = ""  # restore from this image directory when set
    parent_checkpoint: str = ""

    @property
    def process(self) -> Mapping[str, Any]:
        return self.spec.get("process") or {}

    @property
    def args(self) -> list[str]:
        return list(self.process.get("args") or [])

    @property
    def annotations(self) -> Mapping[str, str]:
        return self.spec.get("annotations") or {}


@attrs.frozen
class ExecProcess:
    """An extra process to run in container `container_id` (OCI `process` object)."""

    container_id: str
    exec_id: str
    process: Mapping[str, Any]
    io: ProcessIO


@attrs.frozen
class Created:
    pid: int  # 0 only for backends that report exits through the host callback
    console_fd: int | None = None  # pty master of a terminal process; the framework owns it


@attrs.frozen
class Started:
    pid: int
    console_fd: int | None = None


@attrs.frozen
class PidInfo:
    pid: int
    exec_id: str = ""


class Backend(abc.ABC):
    """Base class of isolation drivers. One instance serves every container of a shim.

    The constructor gets the `Host`: the framework's services for backends
    (running helper commands through the reaper, the backend's configuration,
    reporting exits and OOMs). Methods are called from several threads, one
    call per container at a time.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Cap]] = frozenset()
    # A Kubernetes pod's sandbox (pause) container is only given to backends that can
    # run an ordinary Linux pause binary; selection skips the others for it.
    runs_sandbox_containers: ClassVar[bool] = True

    def __init__(self, host: Host) -> None:
        self.host = host

    @classmethod
    @abc.abstractmethod
    def probe(cls, config: Mapping[str, Any]) -> Probe:
        """Can this host run the backend? A "no" skips the backend, with the reason shown."""

    @classmethod
    def unsupported(cls, cap: Cap) -> str:
        """Why the backend lacks *cap*, for the error a user sees (e.g. wasm: terminals)."""
        return ""

    @classmethod
    def recognizes(cls, entrypoint: Path) -> bool:
        """Is *entrypoint* (a file inside the rootfs) something only this backend runs?

        Selection's auto-detection asks every installed backend (rule 3; policy then
        refuses a disallowed one, saying why). Read as little as possible: this runs on
        every Create that no annotation decided."""
        return False

    # -- required --

    @abc.abstractmethod
    def create(self, container: Container) -> Created:
        """Create the init process, ready to run but not running user code yet."""

    @abc.abstractmethod
    def start(self, container_id: str) -> Started:
        """Let the init process run."""

    @abc.abstractmethod
    def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        """Signal the init (empty *exec_id*; *all*: every process) or an exec process.

        NotFound when the process is already gone."""

    @abc.abstractmethod
    def delete(self, container_id: str, exec_id: str = "") -> None:
        """Forget an exited process; for the init also the container's runtime state."""

    @classmethod
    def cleanup(
        cls, bundle: Path, container_id: str, namespace: str, config: Mapping[str, Any]
    ) -> None:
        """Remove what a dead shim left of *container_id* (the `delete` action).

        Must be idempotent and quick (containerd allows 5 s). Default: nothing to do."""
        return None

    # -- optional, each behind a capability --
    # The task service calls one only when the backend declares its capability (else it
    # answers Unimplemented naming the backend), so these defaults are never reached.

    def exec(self, process: ExecProcess) -> None:  # Cap.EXEC
        """Register an exec process; `start(container_id, exec_id)` follows."""
        raise NotImplementedError

    def start_exec(self, container_id: str, exec_id: str) -> Started:  # Cap.EXEC
        raise NotImplementedError

    def pause(self, container_id: str) -> None:  # Cap.PAUSE
        raise NotImplementedError

    def resume(self, container_id: str) -> None:  # Cap.PAUSE
        raise NotImplementedError

    def update(self, container_id: str, resources: Mapping[str, Any]) -> None:  # Cap.UPDATE
        """Apply OCI `linux.resources` (JSON object) to the running container."""
        raise NotImplementedError

    def pids(self, container_id: str) -> Sequence[PidInfo]:  # Cap.PIDS
        """Every pid of the container. Without the capability the framework lists the
        processes of the init's cgroup."""
        raise NotImplementedError

    def stats(self, container_id: str) -> Any:  # Cap.STATS
        """A `google.protobuf.Any` of cgroup v1 or v2 `Metrics`. Without the capability
        the framework reads the init's cgroup."""
        raise NotImplementedError

    def checkpoint(self, container_id: str, path: str, options: Mapping[str, Any]) -> None:
        """Checkpoint the init into *path* (`containerd.runc.v1.CheckpointOptions` as a dict,
        keys as in the proto: exit, open_tcp, work_path, ...)."""  # Cap.CHECKPOINT
        raise NotImplementedError
