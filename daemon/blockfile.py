"""The blockfile driver: every snapshot is one ext4 image file, mounted with `loop`.

containerd's blockfile snapshotter (`plugins/snapshots/blockfile`, spec §5)
with three changes: the scratch image is made here with `mkfs.ext4` instead
of being supplied, copies keep holes (or share extents), and Usage measures
what the image holds. Meant for VM runtimes that attach an image as a
block device; on the host each mount needs a loop device.

Layout (spec §5.2):

    <root>/scratch          an empty ext4 filesystem of `--blockfile-size` bytes
                            (default 64 MiB): no lost+found, root 0755 owned by 0:0
    <root>/snapshots/<id>   active, committed, or parentless view: an image
                            holding the whole filesystem (all layers below it too)
                            view with parents: an empty file (it mounts its parent's image)

Lifecycle:

- Prepare (any parents) and View without parents: copy the direct parent's
  image, or the scratch image, to `snapshots/<id>`, fsync'd, inside the
  write transaction. View with parents copies nothing.
- Mounts: one mount, type `ext4`, options [loop, rw] for an active on its
  own image; [loop, ro] for a view, on its own image without parents, else
  on the direct parent's image. The walking differ mounts the image and
  untars into it, so whiteouts are plain deletions and there are never
  overlay mounts.
- Commit ("convert"): an image whose journal needs recovery, or that was
  not cleanly unmounted, is repaired first with `e2fsck -p` (which replays
  the journal): a read-only mount of such an image fails ("recovery
  required on readonly filesystem", spec §5.3), and every view of a layer
  and every child copy reads the committed image. If the image is still
  attached to a loop device (mounted somewhere) 10 s later, it is refused
  with FailedPrecondition instead: replaying a mounted filesystem's journal
  would corrupt it. (The wait covers copies of the mount that a mount
  namespace made meanwhile keep alive for a moment after the unmount.)
  Then one fsync (measuring usage needs it first); the file stays where it is.
- Remove: the image goes to the trash and is deleted.

Copies. A scratch image is sparse: a 64 MiB filesystem occupies about
400 KiB (`lazy_itable_init=0` zeroes inode tables by punching holes and marks
them zeroed, so the kernel never writes them; `lazy_journal_init=1` leaves
the journal a hole, which reads as zeros in a new file). Upstream copies
with `copy_file_range` over the whole file, which on ext4 allocates the
full image size for every snapshot (spec §5.3). Here a copy is
(1) a reflink (`FICLONE`), sharing every extent, where the filesystem can
(XFS with reflink, btrfs), else (2) a sparse copy: `SEEK_DATA`/`SEEK_HOLE`
find the data extents and `copy_file_range` copies only those, so a child
occupies what its parent does. Either way the copy is fsync'd before the
transaction commits.

Usage (deliberately not upstream's): upstream reports the image's apparent
size minus the parent's, i.e. the full image size for a base layer and 0
for every other layer, and 1 inode. Here size is the bytes the image file
occupies (`st_blocks`, after an fsync settles delayed allocation) and
inodes are the inodes in use in the ext4 filesystem (from its superblock),
each minus the direct parent image's, never below 0. That is the layer's
own data on a sparse or reflinked copy. The superblock counts are exact
once the image is unmounted; while it is mounted they lag behind.

Size. `--blockfile-size` sets the size of the scratch image, so of every
new parentless snapshot; a child always has its parent's size. Changing
the size rebuilds the scratch image at the next start and leaves existing
snapshots alone. There is no resize.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
import time
from collections.abc import Mapping
from pathlib import Path

import attrs

from daemon.driver import Driver, DriverOptions, Probe, fsync, host_lacks, run
from daemon.model import Kind, Mount, Snapshot, Usage
from shim_framework import _platform as plat
from shim_framework.errors import FailedPrecondition

log = logging.getLogger("polyshim.snapshotd.blockfile")

DEFAULT_SIZE = 64 << 20
SCRATCH = "scratch"
FS_TYPE = "ext4"
MOUNT_OPTIONS = ("loop",)  # containerd's default `mount_options`
# Sparse from the start, and nothing for the kernel to initialise later (see above).
MKFS_OPTIONS = ("-q", "-F", "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=1")
TOOL_TIMEOUT = 600  # seconds for mkfs.ext4, debugfs, e2fsck on one image
PACKAGE = "e2fsprogs"  # Debian's, which has those tools
DETACH_WAIT = 10.0  # seconds Commit waits for a dirty image to be unmounted everywhere

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
# errnos meaning "this filesystem (pair) cannot reflink": fall back to copying.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_CHUNK = 8 << 20

# ext4 superblock (fs/ext4/ext4.h `struct ext4_super_block`), 1024 bytes at offset 1024.
_SB_OFFSET = 1024
_SB_MAGIC = 0xEF53
_SB_INCOMPAT_RECOVER = 0x0004  # journal needs recovery
_SB_STATE_VALID = 0x0001  # cleanly unmounted


@attrs.frozen
class Superblock:
    """What the driver reads of an ext4 superblock."""

    inodes: int
    free_inodes: int
    needs_recovery: bool
    clean: bool

    @property
    def used_inodes(self) -> int:
        return self.inodes - self.free_inodes


class BlockfileDriver(Driver):
    """One ext4 image per snapshot, as containerd's blockfile snapshotter."""

    name = "blockfile"

    def __init__(self, root: Path, options: DriverOptions | None = None) -> None:
        super().__init__(root, options)
        self.size = self.options.blockfile_size or DEFAULT_SIZE
        self.scratch = self.root / SCRATCH
        self._make_scratch()

    @classmethod
    def probe(cls, root: Path) -> Probe:
        """e2fsprogs, ext4 and loop devices, and a test image that mounts read-write."""
        tools = ("mkfs.ext4", "debugfs", "e2fsck")
        if reason := host_lacks(FS_TYPE, "the kernel has no ext4 (modprobe ext4)", tools, PACKAGE):
            return Probe.no(reason)
        if not os.path.exists("/dev/loop-control"):
            return Probe.no("no loop devices (/dev/loop-control is missing; modprobe loop)")
        failure = f"test ext4 image in {root} does not build or mount"
        return cls._probe_mount(Path(root), _mount_test, failure)

    # ------------------------------------------------------------------ the interface

    def create(self, snap: Snapshot, labels: Mapping[str, str]) -> None:
        path = self._clear_leftover(snap.id)
        if snap.kind == Kind.VIEW and snap.parent_ids:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)  # nothing to copy: the view mounts its parent's image
        else:
            source = self.path(snap.parent_ids[0]) if snap.parent_ids else self.scratch
            copy_image(source, path)

    def mounts(self, snap: Snapshot) -> list[Mount]:
        if snap.kind == Kind.VIEW:
            source = self.path(snap.parent_ids[0] if snap.parent_ids else snap.id)
            return [Mount(FS_TYPE, str(source), options=(*MOUNT_OPTIONS, "ro"))]
        return [Mount(FS_TYPE, str(self.path(snap.id)), options=(*MOUNT_OPTIONS, "rw"))]

    def convert(self, snap: Snapshot) -> Usage:
        image = self.path(snap.id)
        sb = read_superblock(image)
        if sb is not None and (sb.needs_recovery or not sb.clean):
            device = _wait_detached(image)
            if device is not None:
                raise FailedPrecondition(
                    f"image {image} is still attached to {device}: unmount the snapshot "
                    "before committing it"
                )
            sb = read_superblock(image)  # the last user may have unmounted it cleanly meanwhile
        if sb is not None and (sb.needs_recovery or not sb.clean):
            log.info("blockfile: %s was not cleanly unmounted; repairing it to commit it", image)
            _repair(image)
        return self._usage(snap)

    def usage(self, snap: Snapshot) -> Usage:
        if snap.kind != Kind.ACTIVE:
            return Usage()
        return self._usage(snap)

    def sync(self, sid: int) -> None:
        # Only the directory entry: Commit calls this right after `convert`, whose `_usage`
        # fsync'd the image already; a second fsync would cost another journal round.
        fsync(self.snapshots_dir)

    # ------------------------------------------------------------------ helpers

    def _usage(self, snap: Snapshot) -> Usage:
        image = self.path(snap.id)
        fsync(image)  # settle delayed allocation: st_blocks then counts every written block
        own = image_usage(image)
        if not snap.parent_ids:
            return own
        # No fsync: a committed image is unchanged since its Commit synced it.
        parent = image_usage(self.path(snap.parent_ids[0]))
        return Usage(max(0, own.size - parent.size), max(0, own.inodes - parent.inodes))

    def _make_scratch(self) -> None:
        """Build `<root>/scratch` unless one of the configured size is there."""
        for stale in self.root.glob(f"{SCRATCH}.new-*"):
            stale.unlink(missing_ok=True)  # a build a crash interrupted
        try:
            current = self.scratch.stat().st_size
        except FileNotFoundError:
            current = None
        if current == self.size:
            return
        if current is not None:
            log.info(
                "blockfile: new parentless snapshots get %d bytes instead of %d; existing "
                "snapshots keep their size", self.size, current,
            )  # fmt: skip
        tmp = self.root / f"{SCRATCH}.new-{secrets.token_hex(4)}"
        try:
            make_image(tmp, self.size)
            os.rename(tmp, self.scratch)
        finally:
            tmp.unlink(missing_ok=True)
        fsync(self.root)


# ---------------------------------------------------------------------- images


def make_image(path: Path, size: int) -> None:
    """Create *path*: an empty ext4 filesystem of *size* bytes, sparse, without lost+found.

    The root directory is 0755 and owned by 0:0 (containerd's scratch rules,
    spec §5.3). FailedPrecondition: e2fsprogs is missing; OSError: it failed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    run(["mkfs.ext4", *MKFS_OPTIONS, str(path)], PACKAGE, TOOL_TIMEOUT)
    run(["debugfs", "-w", "-R", "rmdir lost+found", str(path)], PACKAGE, TOOL_TIMEOUT)
    listing = run(["debugfs", "-R", "ls -p /", str(path)], PACKAGE, TOOL_TIMEOUT)
    names = {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}
    if names != {".", ".."}:
        raise OSError(errno.EIO, f"new image {path}: root holds {sorted(names)}, expected nothing")
    fsync(path)


def copy_image(source: Path, target: Path) -> str:
    """Copy image *source* to new file *target*, fsync'd; "reflink" or "sparse": how.

    A reflink shares all extents; a sparse copy copies only the data extents
    and leaves holes as holes. *target* must not exist; on failure it is removed."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                how = "reflink"
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                _sparse_copy(src, dst)
                how = "sparse"
            os.fsync(dst)
        except BaseException:
            os.close(dst)
            target.unlink(missing_ok=True)
            raise
        os.close(dst)
    finally:
        os.close(src)
    return how


def _sparse_copy(src: int, dst: int) -> None:
    size = os.fstat(src).st_size
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        _copy_range(src, dst, data, hole - data)
        offset = hole


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, min(end - offset, _CHUNK), offset, offset)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            n = _copy_chunk(src, dst, offset, min(end - offset, _CHUNK))
        if n == 0:
            raise OSError(errno.EIO, f"image shrank while being copied (at byte {offset})")
        offset += n


def _copy_chunk(src: int, dst: int, offset: int, length: int) -> int:
    data = os.pread(src, length, offset)
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.pwrite(dst, view[written:], offset + written)
    return len(data)


def read_superblock(image: Path) -> Superblock | None:
    """The ext4 superblock of *image*; None if it has none (not ext2/3/4)."""
    with open(image, "rb") as f:
        f.seek(_SB_OFFSET)
        raw = f.read(1024)
    if len(raw) < 1024 or struct.unpack_from("<H", raw, 0x38)[0] != _SB_MAGIC:
        return None
    inodes, free_inodes = (
        struct.unpack_from("<I", raw, 0x00)[0],
        struct.unpack_from("<I", raw, 0x10)[0],
    )
    state = struct.unpack_from("<H", raw, 0x3A)[0]
    incompat = struct.unpack_from("<I", raw, 0x60)[0]
    return Superblock(
        inodes=inodes,
        free_inodes=free_inodes,
        needs_recovery=bool(incompat & _SB_INCOMPAT_RECOVER),
        clean=bool(state & _SB_STATE_VALID),
    )


def image_usage(image: Path) -> Usage:
    """Bytes *image* occupies on disk and inodes in use inside it (see the module docstring);
    fsync it first if it was written since its last fsync."""
    size = os.stat(image).st_blocks * 512
    sb = read_superblock(image)
    return Usage(size=size, inodes=sb.used_inodes if sb is not None else 1)


def loop_device_of(image: Path) -> str | None:
    """The loop device *image* is attached to, if any (`/sys/block/loop*/loop/backing_file`)."""
    real = os.path.realpath(image)
    try:
        devices = os.listdir("/sys/block")
    except FileNotFoundError:
        return None
    for name in devices:
        if not name.startswith("loop"):
            continue
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # not bound (ENODEV), or gone meanwhile
        if backing == real:
            return f"/dev/{name}"
    return None


def _wait_detached(image: Path) -> str | None:
    """Wait up to DETACH_WAIT seconds for *image* to leave its loop device; None once it has.

    An unmount is not always the last one: a mount namespace created while
    the image was mounted (a container starting meanwhile) holds a copy of the
    mount, which keeps the filesystem mounted, and so dirty, until that
    namespace drops it, typically within milliseconds."""
    deadline = time.monotonic() + DETACH_WAIT
    while (device := loop_device_of(image)) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    return device


def _repair(image: Path) -> None:
    """Replay the journal of unmounted *image* and fix what a crash left (`e2fsck -p`)."""
    try:
        run(["e2fsck", "-p", str(image)], PACKAGE, TOOL_TIMEOUT, ok=(0, 1))
    except OSError as exc:
        raise OSError(exc.errno, f"image {image} needs repair and e2fsck failed: {exc}") from exc


def _mount_test(td: Path) -> None:
    """Build a small image in empty directory *td*, mount it read-write with a loop device,
    write to it, unmount it."""
    make_image(td / "probe.img", 4 << 20)
    (td / "mnt").mkdir()
    with plat.attach_loop(str(td / "probe.img"), readonly=False) as device:
        plat.mount(device, str(td / "mnt"), FS_TYPE, 0, "")
    try:
        (td / "mnt" / "probe").write_text("blockfile\n")
    finally:
        plat.unmount(str(td / "mnt"))
