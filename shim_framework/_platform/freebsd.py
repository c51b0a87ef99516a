"""FreeBSD: procctl, nmount(2)/unmount(2) and getfsstat(2), through ctypes on libc.

Untested on this project's CI (which is Linux); written against FreeBSD 12+
headers. What FreeBSD has no counterpart for raises `Unimplemented`:

- Linux-only mount flags are 0 here, so option parsers pass those options on
  as filesystem data (containerd's rule for unsupported flags);
- there is no lazy unmount: `MNT_DETACH` is MNT_FORCE, the closest thing;
- loop devices are md(4) vnode devices, managed by `mdconfig`; not done yet;
- a mount cannot take a private cwd (`mount(cwd=...)`): overlayfs, the only user, is
  Linux-only anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from typing import NoReturn

from shim_framework._platform.common import MountEntry
from shim_framework.errors import Unimplemented

_libc = ctypes.CDLL(None, use_errno=True)

# sys/wait.h (idtype_t) and sys/procctl.h
P_PID = 0
PROC_REAP_RELEASE = 3  # sys/procctl.h
PROC_REAP_ACQUIRE = 2

# sys/mount.h
MNT_RDONLY = 0x00000001
MNT_SYNCHRONOUS = 0x00000002
MNT_NOEXEC = 0x00000004
MNT_NOSUID = 0x00000008
MNT_UPDATE = 0x00010000
MNT_FORCE = 0x00080000
MNT_NOATIME = 0x10000000
MNT_NOWAIT = 2  # getfsstat mode: do not refresh statistics

# The Linux names the core uses, as FreeBSD flags; 0 where FreeBSD has none.
MS_RDONLY = MNT_RDONLY
MS_NOSUID = MNT_NOSUID
MS_NOEXEC = MNT_NOEXEC
MS_SYNCHRONOUS = MNT_SYNCHRONOUS
MS_REMOUNT = MNT_UPDATE
MS_NOATIME = MNT_NOATIME
MS_NODEV = 0  # device nodes only live on devfs
MS_MANDLOCK = 0
MS_DIRSYNC = 0
MS_NODIRATIME = 0
MS_BIND = 0  # nullfs is a filesystem type here, not a flag
MS_REC = 0
MS_SILENT = 0
MS_UNBINDABLE = 0
MS_PRIVATE = 0
MS_SLAVE = 0
MS_SHARED = 0
MS_RELATIME = 0
MS_STRICTATIME = 0
MNT_DETACH = MNT_FORCE  # no lazy unmount on FreeBSD

_libc.procctl.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
_libc.unmount.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.nmount.argtypes = [ctypes.POINTER(_IOVec), ctypes.c_uint, ctypes.c_int]


class _Statfs(ctypes.Structure):
    """struct statfs of sys/mount.h, STATFS_VERSION 0x20140518 (FreeBSD 12 and later)."""

    _fields_ = [
        ("f_version", ctypes.c_uint32),
        ("f_type", ctypes.c_uint32),
        ("f_flags", ctypes.c_uint64),
        ("f_bsize", ctypes.c_uint64),
        ("f_iosize", ctypes.c_uint64),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_int64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_int64),
        ("f_syncwrites", ctypes.c_uint64),
        ("f_asyncwrites", ctypes.c_uint64),
        ("f_syncreads", ctypes.c_uint64),
        ("f_asyncreads", ctypes.c_uint64),
        ("f_spare", ctypes.c_uint64 * 10),
        ("f_namemax", ctypes.c_uint32),
        ("f_owner", ctypes.c_uint32),
        ("f_fsid", ctypes.c_int32 * 2),
        ("f_charspare", ctypes.c_char * 80),
        ("f_fstypename", ctypes.c_char * 16),  # MFSNAMELEN
        ("f_mntfromname", ctypes.c_char * 1024),  # MNAMELEN
        ("f_mntonname", ctypes.c_char * 1024),
    ]


assert ctypes.sizeof(_Statfs) == 2344, "struct statfs layout does not match sys/mount.h"

_libc.getfsstat.argtypes = [ctypes.POINTER(_Statfs), ctypes.c_long, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def set_child_subreaper(enabled: bool = True) -> None:
    """Make this process the reaper of its descendants (procctl PROC_REAP_ACQUIRE/RELEASE)."""
    if not enabled:
        _libc.procctl(P_PID, os.getpid(), PROC_REAP_RELEASE, None)
        return
    if _libc.procctl(P_PID, os.getpid(), PROC_REAP_ACQUIRE, None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:  # EBUSY: we already are the reaper
            raise OSError(err, f"procctl(PROC_REAP_ACQUIRE): {os.strerror(err)}")


def set_cmdline(args: list[str]) -> None:
    """Show *args* as this process's command line, through libc's setproctitle(3)."""
    title = " ".join(args[1:]).encode()
    _libc.setproctitle(b"-%s", title)


def mount(
    source: str, target: str, fstype: str, flags: int, data: str, cwd: str | None = None
) -> None:
    """nmount(2): *data* ("a=b,c") becomes name/value pairs after fstype, fspath and from."""
    if cwd is not None:
        _unimplemented("mounting relative to a private cwd (long overlay option lists)")
    if fstype == "bind":  # the Linux name containerd's mounts use; nullfs is FreeBSD's
        fstype = "nullfs"
    pairs: list[tuple[str, str | None]] = [("fstype", fstype), ("fspath", target)]
    if source:
        pairs.append(("from", source))
    for option in filter(None, data.split(",")):
        name, equals, value = option.partition("=")
        pairs.append((name, value if equals else None))
    errmsg = ctypes.create_string_buffer(256)  # the kernel explains EINVAL here
    keep = [errmsg]
    iov = (_IOVec * (2 * len(pairs) + 2))()
    for i, item in enumerate([x for pair in pairs for x in pair]):
        if item is not None:
            buf = ctypes.create_string_buffer(os.fsencode(item))  # NUL included in len
            keep.append(buf)
            iov[i] = _IOVec(ctypes.addressof(buf), len(buf))
    name = ctypes.create_string_buffer(b"errmsg")
    keep.append(name)
    iov[-2] = _IOVec(ctypes.addressof(name), len(name))
    iov[-1] = _IOVec(ctypes.addressof(errmsg), len(errmsg))
    if _libc.nmount(iov, len(iov), flags) != 0:
        err = ctypes.get_errno()
        detail = errmsg.value.decode(errors="replace") or os.strerror(err)
        raise OSError(err, f"mount {fstype} {source!r} on {target!r}: {detail}")


def unmount(target: str, flags: int = 0) -> None:
    """unmount(2)."""
    _check(_libc.unmount(os.fsencode(target), flags), f"unmount {target!r}")


def mount_table() -> list[MountEntry]:
    """The mounts, in getfsstat(2) order (the order they were mounted)."""
    count = _libc.getfsstat(None, 0, MNT_NOWAIT)
    if count >= 0:
        buf = (_Statfs * (count + 16))()  # room for mounts made meanwhile
        count = _libc.getfsstat(buf, ctypes.sizeof(buf), MNT_NOWAIT)
    if count < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getfsstat: {os.strerror(err)}")
    return [
        MountEntry(os.fsdecode(buf[i].f_mntonname), os.fsdecode(buf[i].f_fstypename), "/", "")
        for i in range(count)
    ]


@contextlib.contextmanager
def attach_loop(
    path: str, readonly: bool, direct_io: bool = False, autoclear: bool = True
) -> Iterator[str]:
    _unimplemented(f"loop devices (for {path!r}); attach it with mdconfig -a -t vnode")
    yield ""  # pragma: no cover


def detach_loop(device: str) -> None:
    _unimplemented(f"loop devices ({device}); detach it with mdconfig -d")


def _unimplemented(what: str) -> NoReturn:
    raise Unimplemented(f"{what}: not implemented on FreeBSD")
