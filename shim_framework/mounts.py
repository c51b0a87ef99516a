"""The rootfs mounts of Create: containerd's `Mount` list, mounted onto the bundle's rootfs.

containerd sends `rootfs` as a list of `containerd.types.Mount {type, source,
target, options}`. They are mounted in order onto `<bundle>/rootfs`, or onto
`<bundle>/rootfs/<target>` for a submount, and removed on Delete by
`unmount_all`. The rules are containerd's (`core/mount/mount_linux.go`):

- options in the flag table become mount flags (`ro`, `nosuid`, `rbind`, ...,
  each `no...` word clearing what its partner sets); `loop` attaches the
  source to a loop device first (read-only with `ro`; `direct-io` with it);
  every other option is filesystem data, joined with ",";
- propagation changes go in a second mount(2) call, and a read-only bind
  mount is remounted read-only afterwards, because MS_BIND ignores MS_RDONLY.
  (containerd's table has no propagation words, so `rprivate` would reach the
  filesystem as data; we honour them as flags.) `defaults` means no flag;
  containerd passes it on as data, which the kernel refuses;
- overlay options longer than a page minus 512 bytes: mount(2) copies one
  page of data, and dozens of layers overflow it. The common directory of the
  lowerdirs becomes the cwd of the mount call and the lowerdirs become
  relative to it. The cwd is private to one short-lived thread
  (`_platform.mount(cwd=...)`): a chdir of the shim would race with every
  other thread, and the `lowerdir+` option of the new mount API that would
  avoid all this needs Linux 6.8.

Two additions of ours: a `bind` type without `bind`/`rbind` gets MS_BIND, and
an erofs image file the kernel cannot mount directly (before Linux 6.12
erofs needs a block device) is retried through a loop device.

Resource handling: a loop device is attached with autoclear and our fd to it
closed right after the mount, so the device goes away with the mount.
Error handling: `mount_all` undoes its own mounts when one fails and raises
InvalidArgument (FailedPrecondition for permission errors, Unimplemented for
what we cannot mount yet) naming the mount; `unmount_all` treats "not
mounted" as done and detaches busy mounts lazily.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from shim_framework import _platform as plat
from shim_framework.errors import (
    FailedPrecondition,
    InvalidArgument,
    PolyshimError,
    Unimplemented,
)
from shim_framework.rootfs import resolve_in_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shim_framework.backend import Mount

log = logging.getLogger("polyshim.mounts")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PROPAGATION = plat.MS_SHARED | plat.MS_PRIVATE | plat.MS_SLAVE | plat.MS_UNBINDABLE

# option -> (clears the flag?, flag); a flag that is 0 here has no such thing on this platform
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, plat.MS_SYNCHRONOUS),
    "atime": (True, plat.MS_NOATIME),
    "bind": (False, plat.MS_BIND),
    "dev": (True, plat.MS_NODEV),
    "diratime": (True, plat.MS_NODIRATIME),
    "dirsync": (False, plat.MS_DIRSYNC),
    "exec": (True, plat.MS_NOEXEC),
    "mand": (False, plat.MS_MANDLOCK),
    "noatime": (False, plat.MS_NOATIME),
    "nodev": (False, plat.MS_NODEV),
    "nodiratime": (False, plat.MS_NODIRATIME),
    "noexec": (False, plat.MS_NOEXEC),
    "nomand": (True, plat.MS_MANDLOCK),
    "norelatime": (True, plat.MS_RELATIME),
    "nostrictatime": (True, plat.MS_STRICTATIME),
    "nosuid": (False, plat.MS_NOSUID),
    "rbind": (False, plat.MS_BIND | plat.MS_REC),
    "relatime": (False, plat.MS_RELATIME),
    "remount": (False, plat.MS_REMOUNT),
    "ro": (False, plat.MS_RDONLY),
    "rw": (True, plat.MS_RDONLY),
    "strictatime": (False, plat.MS_STRICTATIME),
    "suid": (True, plat.MS_NOSUID),
    "sync": (False, plat.MS_SYNCHRONOUS),
    "private": (False, plat.MS_PRIVATE),
    "rprivate": (False, plat.MS_PRIVATE | plat.MS_REC),
    "shared": (False, plat.MS_SHARED),
    "rshared": (False, plat.MS_SHARED | plat.MS_REC),
    "slave": (False, plat.MS_SLAVE),
    "rslave": (False, plat.MS_SLAVE | plat.MS_REC),
    "unbindable": (False, plat.MS_UNBINDABLE),
    "runbindable": (False, plat.MS_UNBINDABLE | plat.MS_REC),
}


@attrs.frozen
class MountOptions:
    """A mount's option list, split the way mount(2) wants it."""

    flags: int
    data: str  # filesystem options, joined with ","
    loop: bool = False  # attach the source to a loop device first
    direct_io: bool = False  # ... with direct I/O
    idmapped: bool = False  # uidmap=/gidmap= given


def parse_options(options: Sequence[str]) -> MountOptions:
    """Split fstab-style *options* into flags, filesystem data and our own words."""
    flags = 0
    data: list[str] = []
    loop = idmapped = False
    for option in options:
        clear, flag = _FLAGS.get(option, (False, 0))
        if flag:
            flags = flags & ~flag if clear else flags | flag
        elif option == "defaults":
            pass
        elif option == "loop":
            loop = True
        elif option.startswith(("uidmap=", "gidmap=")):
            idmapped = True
        else:
            data.append(option)
    direct_io = loop and "direct-io" in data  # containerd: a loop option, else fs data
    if direct_io:
        data.remove("direct-io")
    return MountOptions(flags, ",".join(data), loop, direct_io, idmapped)


def mount_all(mounts: Sequence[Mount], target: Path) -> None:
    """Mount *mounts* in order onto *target* (each at its `target` subpath below it).

    On failure the mounts made so far are unmounted again, and the error
    names the mount that failed and why."""
    done: list[str] = []
    for number, m in enumerate(mounts, 1):
        try:
            done.append(_mount_one(m, target))
        except (OSError, PolyshimError) as exc:
            _undo(done)
            raise _mount_error(number, len(mounts), m, exc) from exc


def containing(path: str | Path) -> plat.MountEntry | None:
    """The mount *path* is on: at the longest mount point above it, the top one of a stack."""
    real = os.path.realpath(path)
    found, depth = None, -1
    for mount in plat.mount_table():
        if _at_or_below(real, mount.point) and len(mount.point) >= depth:
            found, depth = mount, len(mount.point)
    return found


def points_below(path: str | Path) -> list[str]:
    """Mount points at or below *path* (resolved), in mount table order: parents first, and
    of mounts stacked on one point the top one last."""
    real = os.path.realpath(path)
    return [m.point for m in plat.mount_table() if _at_or_below(m.point, real)]


def _at_or_below(path: str, point: str) -> bool:
    return path == point or path.startswith(point.rstrip("/") + "/")


def unmount_all(target: Path) -> None:
    """Unmount everything at or below *target*, deepest first; busy mounts lazily.

    Idempotent: a missing *target*, or one with nothing mounted, is done."""
    try:
        root = os.path.realpath(target, strict=True)
    except FileNotFoundError:
        return
    if root == "/":
        raise InvalidArgument("unmount_all of /: refusing to unmount the host's root")
    for _ in range(8):  # stacked mounts go one per call; rounds catch mounts made meanwhile
        points = points_below(root)
        if not points:
            return
        # Deepest first; of mounts stacked on one path the top one is listed last.
        for _, _, point in sorted(
            ((p.count("/"), i, p) for i, p in enumerate(points)), reverse=True
        ):
            _unmount_one(point)
    raise FailedPrecondition(
        f"unmount {root}: still mounted after 8 rounds; something keeps mounting there"
    )


def _mount_one(m: Mount, root: Path) -> str:
    """Mount *m* below *root*; return where."""
    base = Path(os.path.realpath(root))
    target = str(resolve_in_root(base, m.target, must_exist=False)) if m.target else str(base)
    if m.type.startswith(("fuse.", "fuse3.")):
        raise Unimplemented(f"FUSE mounts ({m.type}) need a mount helper; not implemented yet")
    options = list(m.options)
    cwd = None
    if m.type == "overlay" and len(",".join(options)) >= PAGE_SIZE - 512:
        cwd, options = _relative_lowerdirs(options)
    opts = parse_options(options)
    if opts.idmapped:
        raise Unimplemented("idmapped mounts (uidmap=/gidmap=) are not implemented yet")
    if len(opts.data) >= PAGE_SIZE:  # the kernel copies one page, NUL included
        raise InvalidArgument(
            f"mount options are {len(opts.data)} bytes, more than the kernel's one page "
            f"({PAGE_SIZE}); use fewer or shorter layer paths"
        )
    flags = opts.flags & ~_PROPAGATION
    if m.type == "bind" and not flags & plat.MS_BIND:
        flags |= plat.MS_BIND
    readonly = bool(flags & plat.MS_RDONLY)

    # A bare remount changes flags only; with data it needs this call (moby/moby#34077).
    mounted = False
    if not flags & plat.MS_REMOUNT or opts.data:
        if opts.loop:
            with plat.attach_loop(m.source, readonly, opts.direct_io) as device:
                plat.mount(device, target, m.type, flags, opts.data)
        else:
            try:
                plat.mount(m.source, target, m.type, flags, opts.data, cwd=cwd)
            except OSError as exc:
                if not _needs_loop(m, exc):
                    raise
                with plat.attach_loop(m.source, readonly) as device:
                    plat.mount(device, target, m.type, flags, opts.data)
        mounted = not flags & plat.MS_REMOUNT
    try:
        if opts.flags & _PROPAGATION:
            keep = _PROPAGATION | plat.MS_REC | plat.MS_SILENT
            plat.mount("", target, "", opts.flags & keep, "")
        if flags & (plat.MS_BIND | plat.MS_RDONLY) == plat.MS_BIND | plat.MS_RDONLY:
            plat.mount("", target, "", flags | plat.MS_REMOUNT, "")
    except OSError:
        if mounted:
            _undo([target])
        raise
    return target


def _needs_loop(m: Mount, exc: OSError) -> bool:
    """An erofs image file on a kernel that mounts erofs from block devices only."""
    return m.type == "erofs" and exc.errno == errno.ENOTBLK and os.path.isfile(m.source)


def _relative_lowerdirs(options: list[str]) -> tuple[str | None, list[str]]:
    """(cwd, options) with the lowerdirs relative to their common directory.

    Snapshotters keep layers side by side (`.../snapshots/<id>/fs`), so
    the relative paths are short. No common directory: unchanged."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), None)
    if index is None:
        return None, options
    dirs = options[index].removeprefix("lowerdir=").split(":")
    if len(dirs) < 2 or not all(d.startswith("/") for d in dirs):
        return None, options
    common = os.path.commonpath(dirs)
    if common == "/" or not all(d.startswith(common + "/") and d != common + "/" for d in dirs):
        return None, options
    relative = [d[len(common) + 1 :] for d in dirs]
    return common, [*options[:index], "lowerdir=" + ":".join(relative), *options[index + 1 :]]


def _unmount_one(point: str) -> None:
    try:
        plat.unmount(point)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return  # not a mount point (any more): a lazy unmount above took it
        if exc.errno != errno.EBUSY:
            raise FailedPrecondition(f"unmount {point}: {os.strerror(exc.errno)}") from exc
        try:
            plat.unmount(point, plat.MNT_DETACH)  # busy: detach now, free when unused
        except OSError as lazy:
            if lazy.errno not in (errno.EINVAL, errno.ENOENT):
                raise FailedPrecondition(f"unmount {point}: {os.strerror(lazy.errno)}") from lazy


def _undo(targets: list[str]) -> None:
    for point in reversed(targets):
        try:
            _unmount_one(point)
        except PolyshimError:
            log.exception("mounts: could not undo the mount on %s", point)


def _mount_error(number: int, total: int, m: Mount, exc: Exception) -> PolyshimError:
    where = f"rootfs mount {number} of {total} ({m.type} from {m.source!r}"
    where += f" at {m.target!r})" if m.target else ")"
    if isinstance(exc, PolyshimError):
        return type(exc)(f"{where}: {exc}")
    assert isinstance(exc, OSError)
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return FailedPrecondition(f"{where}: {reason}; the shim needs root (CAP_SYS_ADMIN)")
    hint = "check the snapshotter's mount options"
    if exc.errno == errno.EINVAL:
        hint += "; the kernel log (dmesg) usually says which option it refused"
    return InvalidArgument(f"{where}: {reason}; {hint}")
