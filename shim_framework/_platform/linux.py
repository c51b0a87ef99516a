"""Linux: prctl, mount(2)/umount2(2) and loop devices, through ctypes on libc.

Loop devices: `attach_loop` asks /dev/loop-control for a free device and binds
the file with one LOOP_CONFIGURE (kernel >= 5.8; older kernels get
LOOP_SET_FD + LOOP_SET_STATUS64). Another process may take the same free
device between the two steps; that shows as EBUSY and we ask again, as
util-linux's losetup does. With autoclear the kernel frees the device when
its last user goes: the fd we hold, and then the mount made from it. So the
device is yielded by a context manager that closes our fd on exit: mount
inside the `with`, and the device lives exactly as long as the mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator

from shim_framework._platform.common import MountEntry

_libc = ctypes.CDLL(None, use_errno=True)
_FS_ENCODING = sys.getfilesystemencoding()
_ESCAPED = re.compile(r"\\([0-7]{3})")
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.unshare.argtypes = [ctypes.c_int]

# linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36

# linux/sched.h
CLONE_FS = 0x200

# sys/mount.h (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2  # umount2: lazy, the mount goes when its last user does

# linux/loop.h
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_char * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


assert ctypes.sizeof(_LoopConfig) == 304, "struct loop_config layout does not match linux/loop.h"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str) -> bytes | None:
    return os.fsencode(s) if s else None


def set_child_subreaper(enabled: bool = True) -> None:
    """Make orphaned descendants of this process our children, not init's (or stop it).

    Not inherited across fork: call it in the long-running server itself."""
    flag = 1 if enabled else 0
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, flag, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def set_cmdline(args: list[str]) -> None:
    """Show *args* as this process's command line (`ps`, /proc/<pid>/cmdline).

    Overwrites the original argv area in place (its bounds are fields 48-49 of
    /proc/self/stat), truncating what does not fit, as setproctitle does."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])
    size = end - start
    if size <= 1:
        return
    raw = "\0".join(args).encode()[: size - 1]
    ctypes.memmove(start, raw.ljust(size, b"\0"), size)


def mount(
    source: str, target: str, fstype: str, flags: int, data: str, cwd: str | None = None
) -> None:
    """mount(2). With *cwd*, relative paths in *source* and *data* resolve against it.

    *cwd* exists for overlay options too long for one page (see `mounts`). A
    chdir would move every thread of the shim; instead the call runs in a
    short-lived thread that first unshares its filesystem context
    (unshare(CLONE_FS), the thread's own cwd), as containerd's `mountAt` does.
    The thread ends right after, so nothing else ever runs with that cwd."""

    def call() -> None:
        what = f"mount {fstype or '(no type)'} {source!r} on {target!r}"
        _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), what)

    if cwd is None:
        call()
    else:
        _in_private_cwd(cwd, call)


def _in_private_cwd(cwd: str, fn: Callable[[], None]) -> None:
    failure: list[BaseException] = []

    def body() -> None:
        try:
            _check(_libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
            os.chdir(cwd)  # this thread's cwd only, after the unshare
            fn()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="polyshim-mount-at")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def unmount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(os.fsencode(target), flags), f"unmount {target!r}")


def mount_table() -> list[MountEntry]:
    """The mounts of this mount namespace, in /proc/self/mountinfo order (parents first)."""
    with open("/proc/self/mountinfo", "rb") as f:
        text = f.read().decode(_FS_ENCODING, "surrogateescape")
    table = []
    for line in text.splitlines():
        # id parent major:minor root point options [optional...] - fstype source superoptions
        head, separator, tail = line.partition(" - ")  # no field holds a raw space
        if not separator:
            continue
        root, point = head.split(" ", 5)[3:5]
        fstype, _, options = [*tail.split(" ", 2), "", ""][:3]
        entry = MountEntry(point, fstype, root, options)
        table.append(MountEntry(*map(_unescape, entry)) if "\\" in line else entry)
    return table


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash inside a field as \\ooo."""
    return _ESCAPED.sub(lambda m: chr(int(m[1], 8)), field)


@contextlib.contextmanager
def attach_loop(
    path: str, readonly: bool, direct_io: bool = False, autoclear: bool = True
) -> Iterator[str]:
    """Bind *path* to a free loop device and yield its name, `/dev/loopN`.

    Resource handling: with *autoclear* (the default) the device frees itself
    once the `with` block has ended and nothing else (a mount) holds it.
    Without it the device stays bound until `detach_loop`.
    Error handling: EBUSY from a device another process took first is retried;
    anything else raises OSError naming file and device."""
    open_flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    lo_flags = (LO_FLAGS_READ_ONLY if readonly else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    backing = os.open(path, open_flags)
    try:
        for attempt in range(1, 100):
            device = f"/dev/loop{_free_loop_number()}"
            loop_fd = os.open(device, open_flags)
            try:
                _bind_loop(loop_fd, backing, path, lo_flags, direct_io)
                break
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno != errno.EBUSY:
                    raise OSError(
                        exc.errno, f"attach {path!r} to {device}: {exc.strerror}"
                    ) from exc
                time.sleep(random.uniform(0, attempt / 1000))  # back off, avoid lockstep
        else:
            raise OSError(errno.EBUSY, f"attach {path!r}: every free loop device was taken")
    finally:
        os.close(backing)  # the bound device keeps its own reference to the file
    try:
        yield device
    finally:
        os.close(loop_fd)


def _free_loop_number() -> int:
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise OSError(exc.errno, f"no free loop device: {exc.strerror}") from exc
    finally:
        os.close(ctl)


def _bind_loop(loop_fd: int, backing: int, path: str, lo_flags: int, direct_io: bool) -> None:
    info = _LoopInfo64(lo_flags=lo_flags | (LO_FLAGS_DIRECT_IO if direct_io else 0))
    info.lo_file_name = os.fsencode(path)[: LO_NAME_SIZE - 1]
    if _kernel_at_least(5, 8):
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, bytes(_LoopConfig(fd=backing, info=info)))
        return
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing)
    try:
        info.lo_flags = lo_flags  # direct I/O has its own ioctl here
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, bytes(info))
        if direct_io:
            fcntl.ioctl(loop_fd, LOOP_SET_DIRECT_IO, 1)
    except OSError:
        fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
        raise


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= (major, minor)


def detach_loop(device: str) -> None:
    """Unbind loop *device*; a device that is not bound is left alone."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: not bound
            raise OSError(exc.errno, f"detach {device}: {exc.strerror}") from exc
    finally:
        os.close(fd)
