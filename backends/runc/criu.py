"""Checkpoint and restore through CRIU: the runtime's flags, and what to say when criu fails.

runc runs criu itself (`--criu <path>`); crun links libcriu, which runs the criu
binary too, so both need it installed. When a dump or restore fails the
runtime only says "criu failed: type DUMP errno 0"; the cause is in criu's
log. So a failure is explained in two steps: if `criu check` fails, criu
cannot work on this host at all (typically a criu older than the kernel: criu
3.17 predates Linux 6.13's split vDSO mapping) and the operation is
Unimplemented here; otherwise the first errors of criu's log are quoted and
the log is kept in the bundle (ref: `criu-dump.log`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from backends.runc.runtime import Result, RuncError
from shim_framework.errors import PolyshimError, Unimplemented

CHECK_TIMEOUT = 30.0


def require(criu: str) -> None:
    """Unimplemented unless the criu binary is installed."""
    if shutil.which(criu) is None:
        raise Unimplemented(
            f"backend runc: checkpoint needs criu ({criu} not found); apt-get install criu"
        )


def checkpoint_flags(options: Mapping[str, Any]) -> list[str]:
    """`containerd.runc.v1.CheckpointOptions` (a dict) as flags, mapped as the ref maps them."""
    flags = [] if options.get("exit") else ["--leave-running"]
    for key, flag in (
        ("open_tcp", "--tcp-established"),
        ("external_unix_sockets", "--ext-unix-sk"),
        ("terminal", "--shell-job"),
        ("file_locks", "--file-locks"),
    ):
        if options.get(key):
            flags.append(flag)
    if options.get("cgroups_mode"):
        flags += ["--manage-cgroups-mode", str(options["cgroups_mode"])]
    for namespace in options.get("empty_namespaces") or ():
        flags += ["--empty-ns", str(namespace)]
    return flags


def explain(
    error: RuncError,
    *,
    action: str,  # "checkpoint" or "restore"
    criu: str,
    run: Callable[..., Result],
    log: Path,  # criu's log in its work dir
    keep_as: Path,  # where the log is kept for a person to read
) -> PolyshimError:
    """The error to raise for a failed checkpoint or restore."""
    broken = check(criu, run)
    if broken:
        return Unimplemented(f"backend runc: {action} needs a working criu; {broken}")
    with contextlib.suppress(OSError):
        shutil.copyfile(log, keep_as)
    try:
        said = errors(keep_as.read_bytes())
    except OSError:
        said = ""
    return RuncError(
        f"{error}{'; criu: ' + said if said else ''} (criu log: {keep_as})",
        detail=error.detail,
        status=error.status,
    )


def check(criu: str, run: Callable[..., Result]) -> str:
    """Why criu cannot work on this host, or "" when `criu check` passes."""
    result = run([criu, "check"], timeout=CHECK_TIMEOUT)
    if result.status == 0:
        return ""
    said = errors((result.stdout or b"") + (result.stderr or b""))
    return (
        f"`criu check` fails on this kernel ({os.uname().release}): "
        f"{said or f'exit status {result.status}'}; a criu older than the kernel often "
        "fails so: upgrade criu"
    )


def errors(output: bytes, limit: int = 2) -> str:
    """The first distinct `Error (file:line): what` lines of criu's output, the `what` parts."""
    found: list[str] = []
    for line in output.decode(errors="replace").splitlines():
        if "Error (" not in line or "): " not in line:
            continue
        what = line.split("): ", 1)[1].strip()
        # "exited, status=1" is criu reporting a helper's exit; the cause follows it
        if what not in found and not what.startswith("exited, status="):
            found.append(what)
    return "; ".join(found[:limit])
