"""What the framework lends a backend: commands through the reaper, its config, callbacks.

A backend never waits for a child itself: the shim's reaper owns every exit
(a backend's own `waitpid` could steal a container's exit, or have its
helper's exit stolen and misread as 0). So helper commands run through
`Host.run`, and long-running processes start through `Host.spawn`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from shim_framework.reaper import CommandResult, Reaper


@attrs.define
class Host:
    """One per backend instance; built by the task service."""

    namespace: str
    config: Mapping[str, Any]  # this backend's table of the runtime config ([backends.<name>])
    reaper: Reaper
    state_dir: Path  # scratch space of this shim for this backend
    process_exited: Callable[[str, str, int], None]  # (container_id, exec_id, status)
    oom: Callable[[str], None]  # container_id ran out of memory
    # containerd's gRPC socket (the shim's -address): its content store, containers, images
    grpc_address: str = ""

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        fds: Mapping[int, int] | None = None,
    ) -> CommandResult:
        """Run a helper command to completion; its exit is collected through the reaper."""
        return self.reaper.run(argv, input=input, timeout=timeout, cwd=cwd, env=env, fds=fds)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        fds: Mapping[int, int] | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        setsid: bool = False,
    ) -> int:
        """Start a long-running process; its exit reaches the task service by pid."""
        return self.reaper.spawn(argv, fds=fds, cwd=cwd, env=env, setsid=setsid)

    def fork(
        self,
        child: Callable[[], int],
        *,
        fds: Mapping[int, int] | None = None,
        setsid: bool = False,
    ) -> int:
        """Run *child* in a forked copy of the shim (for in-process backends such as wasm);
        its exit reaches the task service by pid. See `Reaper.fork` for what the child
        may and may not do."""
        return self.reaper.fork(child, fds=fds, setsid=setsid)
