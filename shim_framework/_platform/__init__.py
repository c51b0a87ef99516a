"""The few kernel calls the framework needs, chosen once for this platform.

Core modules import this package, never `linux` or `freebsd` directly, so
the same core runs on both (as containerd splits `shim_linux.go` from
`shim_freebsd.go`). The API:

- `set_child_subreaper()`: orphaned descendants are re-parented to us;
- `set_cmdline(args)`: what `ps` shows for this process;
- `mount(source, target, fstype, flags, data, cwd=None)`, `unmount(target, flags=0)`,
  the flag constants `MS_*` and `MNT_DETACH`, and `mount_table()` (`MountEntry`s);
- `attach_loop(path, readonly, direct_io=False, autoclear=True)`, a context
  manager yielding a `/dev/loopN`, and `detach_loop(device)`.

Failed system calls raise `OSError` with the errno and a message naming the
paths; what a platform cannot do raises `errors.Unimplemented`. A flag the
platform has no equivalent for is 0, so option parsers can tell (containerd's
rule: an option whose flag is unsupported is passed on as filesystem data).
"""

from __future__ import annotations

import sys

from shim_framework._platform.common import MountEntry

if sys.platform.startswith("linux"):
    from shim_framework._platform.linux import (
        MNT_DETACH,
        MS_BIND,
        MS_DIRSYNC,
        MS_MANDLOCK,
        MS_NOATIME,
        MS_NODEV,
        MS_NODIRATIME,
        MS_NOEXEC,
        MS_NOSUID,
        MS_PRIVATE,
        MS_RDONLY,
        MS_REC,
        MS_RELATIME,
        MS_REMOUNT,
        MS_SHARED,
        MS_SILENT,
        MS_SLAVE,
        MS_STRICTATIME,
        MS_SYNCHRONOUS,
        MS_UNBINDABLE,
        attach_loop,
        detach_loop,
        mount,
        mount_table,
        set_child_subreaper,
        set_cmdline,
        unmount,
    )
elif sys.platform.startswith("freebsd"):
    from shim_framework._platform.freebsd import (
        MNT_DETACH,
        MS_BIND,
        MS_DIRSYNC,
        MS_MANDLOCK,
        MS_NOATIME,
        MS_NODEV,
        MS_NODIRATIME,
        MS_NOEXEC,
        MS_NOSUID,
        MS_PRIVATE,
        MS_RDONLY,
        MS_REC,
        MS_RELATIME,
        MS_REMOUNT,
        MS_SHARED,
        MS_SILENT,
        MS_SLAVE,
        MS_STRICTATIME,
        MS_SYNCHRONOUS,
        MS_UNBINDABLE,
        attach_loop,
        detach_loop,
        mount,
        mount_table,
        set_child_subreaper,
        set_cmdline,
        unmount,
    )
else:
    raise ImportError(
        f"polyshim runs on Linux and FreeBSD, not on {sys.platform!r}: "
        "a containerd shim needs the host kernel's process and mount calls"
    )

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_DIRSYNC",
    "MS_MANDLOCK",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SILENT",
    "MS_SLAVE",
    "MS_STRICTATIME",
    "MS_SYNCHRONOUS",
    "MS_UNBINDABLE",
    "MountEntry",
    "attach_loop",
    "detach_loop",
    "mount",
    "mount_table",
    "set_child_subreaper",
    "set_cmdline",
    "unmount",
]
