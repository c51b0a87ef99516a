"""The OCI runtime's command line, as containerd-shim-runc-v2 drives it (spec §6.1).

Every command is `<binary> --root <root>/<namespace> --log <bundle>/log.json
--log-format json [--systemd-cgroup] <command> ...`. runc and crun both take
these global flags and write one JSON object per line to the log, so a failed
command is explained by the last `"level":"error"` record it appended, as the
reference shim does. Only what this command appended is read (the log is
shared by every command of the container), so an old error is never blamed.

Error handling: a failure raises the class the runtime's words state, the
same for runc and crun (table `_CLASSES`); the backend narrows it per
operation (a kill of a stopped container is NotFound, not FailedPrecondition).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from shim_framework.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolyshimError,
)

DEFAULT_ROOT = Path("/run/containerd/runc")  # containerd's process.RuncRoot
LOG_FILE = "log.json"
HYBRID_UNIFIED = Path("/sys/fs/cgroup/unified/cgroup.controllers")


class Result(Protocol):
    """What a finished command gives back (the reaper's `CommandResult` is one)."""

    status: int
    stdout: bytes | None
    stderr: bytes | None


Runner = Callable[..., Result]  # (argv, *, input, timeout, fds) -> Result


class RuncError(PolyshimError, RuntimeError):
    """The OCI runtime failed in a way no class names; the message carries its own words."""

    def __init__(self, message: str, *, detail: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.detail = detail  # the runtime's message, as logged
        self.status = status


# (words in the runtime's message, lower-cased; the class they state), first match wins.
# Narrow on purpose: "mount destination ... does not exist" in a create is no NotFound.
_CLASSES: tuple[tuple[str, type[PolyshimError]], ...] = (
    ("container does not exist", NotFound),  # runc, every command
    ("already exists", AlreadyExists),  # runc: container with given ID ...; crun: container `x` ...
    ("not running", FailedPrecondition),  # runc: container not running; crun: `x` is not running
    ("already running", FailedPrecondition),  # runc start
    ("not stopped", FailedPrecondition),  # runc delete: ... that is not stopped: running
    ("stopped container", FailedPrecondition),  # runc exec: cannot exec in a stopped container
    ("has stopped", FailedPrecondition),  # runc start: cannot start a container that has stopped
    ("paused", FailedPrecondition),  # runc exec: ... in a paused container; crun: `x` is paused
    ("is not in `", FailedPrecondition),  # crun: `x` is not in `created` or `stopped` state
    ("no such process", FailedPrecondition),  # crun kill of a stopped container: open pidfd: ...
)


@attrs.frozen
class Settings:
    """The `[backends.runc]` table, with defaults and types checked."""

    binary: str = "runc"
    root: Path = DEFAULT_ROOT
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    criu_path: str = ""
    criu_image_path: str = ""
    criu_work_path: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        def text(key: str, default: str = "") -> str:
            value = config.get(key) or default
            if not isinstance(value, str | os.PathLike):
                raise InvalidArgument(f"[backends.runc] {key} must be a string, not {value!r}")
            return os.fspath(value)

        def flag(key: str) -> bool:
            value = config.get(key, False)
            if not isinstance(value, bool):
                raise InvalidArgument(f"[backends.runc] {key} must be true or false, not {value!r}")
            return value

        # io_uid/io_gid (from containerd.runc.v1.Options) are the framework's: stdio owners.
        return cls(
            binary=text("binary", "runc"),
            root=Path(text("root", str(DEFAULT_ROOT))),
            systemd_cgroup=flag("systemd_cgroup"),
            no_pivot_root=flag("no_pivot_root"),
            no_new_keyring=flag("no_new_keyring"),
            criu_path=text("criu_path"),
            criu_image_path=text("criu_image_path"),
            criu_work_path=text("criu_work_path"),
        )


class Runtime:
    """One OCI runtime binary with its state root for one containerd namespace."""

    def __init__(self, settings: Settings, namespace: str, run: Runner) -> None:
        self.settings = settings
        self.root = settings.root / namespace  # ids are unique per namespace only
        self.name = Path(settings.binary).name
        self._run = run

    def __call__(
        self,
        command: str,
        container_id: str,
        bundle: Path,
        args: Sequence[str],
        *,
        input: bytes | None = None,
        fds: Mapping[int, int] | None = None,
        timeout: float | None = None,
        criu: bool = False,
    ) -> Result:
        """Run `<command> <args>`; raise with the runtime's own message when it fails."""
        # a `delete` action may come after the bundle is gone: errors then come from stderr
        log = bundle / LOG_FILE if bundle.is_dir() else Path(os.devnull)
        offset = _size(log)
        argv = [self.settings.binary, "--root", str(self.root), "--log", str(log)]
        argv += ["--log-format", "json"]
        if self.settings.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if criu and self.settings.criu_path and "crun" not in self.name:
            argv += ["--criu", self.settings.criu_path]  # crun has no --criu: it links libcriu
        argv += [command, *args]
        kwargs: dict[str, Any] = {"input": input, "timeout": timeout}
        if fds is not None:
            kwargs["fds"] = fds
        result = self._run(argv, **kwargs)
        if result.status != 0:
            raise self.error(command, container_id, result, last_error(log, offset))
        return result

    def error(self, command: str, container_id: str, result: Result, logged: str) -> PolyshimError:
        detail = logged or _text(result.stderr) or f"exit status {result.status}"
        # runc repeats its command in the message ("runc create failed: ..."): say it once
        detail = detail.removeprefix(f"{self.name} {command} failed: ")
        message = f'container "{container_id}": {self.name} {command} failed: {detail}'
        cls = self._classify(detail, container_id)
        if cls is None:
            return RuncError(message, detail=detail, status=result.status)
        return cls(message)

    def _classify(self, detail: str, container_id: str) -> type[PolyshimError] | None:
        lowered = detail.lower()
        # crun names the missing state file: "error opening file `<root>/<id>/status`: ..."
        state = f"{self.root}/{container_id}"
        if "no such file or directory" in lowered and (
            f"{state}/status" in detail or f"'{state}'" in detail
        ):
            return NotFound
        for words, cls in _CLASSES:
            if words in lowered:
                return cls
        return None


def last_error(log: Path, offset: int = 0) -> str:
    """The `msg` of the last error record appended to *log* after *offset* ("" if none)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    message = ""
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a child's stray text line
        if isinstance(record, dict) and record.get("level") == "error":
            message = str(record.get("msg", "")).strip()
    return message


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _text(data: bytes | str | None) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text.strip()


def unusable(settings: Settings) -> str:
    """Why this host cannot run the configured runtime, or "" when it can."""
    binary = settings.binary
    name = Path(binary).name
    if shutil.which(binary) is None:
        if os.sep in binary and os.path.exists(binary):
            return f"{binary} is not executable; fix it or set backends.runc.binary"
        return f"{binary} not found on PATH; install {name} or set backends.runc.binary"
    if "crun" in name:
        return _crun_hybrid_problem()
    return ""


def _crun_hybrid_problem() -> str:
    """crun (every release so far) refuses hybrid cgroups while cgroup2 holds a controller."""
    try:
        controllers = HYBRID_UNIFIED.read_text().split()
    except OSError:
        return ""  # not hybrid
    if not controllers:
        return ""
    return (
        f"crun cannot create containers on this host: cgroups are hybrid and cgroup2 has "
        f"controllers ({' '.join(controllers)}), which crun refuses; bind them to cgroup v1 "
        f"(e.g. mount -t cgroup -o {controllers[0]} cgroup /sys/fs/cgroup/{controllers[0]}) "
        "or use runc"
    )


@attrs.frozen
class _Completed:
    status: int
    stdout: bytes | None
    stderr: bytes | None


def run_plain(
    argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
) -> Result:
    """A runner on subprocess.run, for a process with no reaper (the `delete` action) ONLY:
    under a reaper its waitpid races the reaper's, and a lost race reads as exit status 0."""
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _Completed(-1, b"", f"timed out after {timeout} s".encode())
    except OSError as e:
        return _Completed(127, b"", str(e).encode())
    return _Completed(done.returncode, done.stdout, done.stderr)
