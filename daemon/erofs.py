"""The erofs driver: overlay snapshots whose committed layers become read-only erofs images.

Theory of operation. An active snapshot or a view is exactly what the
overlay driver makes (`daemon/overlay.py`, which this driver extends): an
upper directory `fs` and an overlay `work` directory, returned as a bind
mount or an overlay mount. Commit turns the upper directory into an erofs
image with Debian's `mkfs.erofs` (erofs-utils 1.5: directory mode, no tar
mode) and from then on the layer is that image, mounted read-only on the
host where the overlay mounts of its children expect a lower directory.
Any containerd (1.6 included) and polyshim's shim can mount the result:
the mounts are plain `bind` and `overlay` mounts, the same forms the
overlay driver returns.

Layout of `<root>/snapshots/<id>/`:

    fs/            active/view: the upper directory (0755)
                   committed: the mount point of layer.erofs, present only while mounted
    work/          overlay workdir (actives)
    commit.erofs   Commit's conversion, written before the metadata says committed
    layer.erofs    the committed layer; exists if and only if the snapshot is committed
    images         marker: Mounts returns the raw image list (see below)

Commit, in the order the service calls (`daemon/driver.py`):

- `convert`: measure the upper (the usage recorded), run
  `mkfs.erofs --quiet -Enoinline_data <id>/commit.erofs.tmp-* <id>/fs` (the
  options containerd's erofs snapshotter uses for its commit-time
  conversion, `internal/erofsutils`), fsync, rename to `commit.erofs`.
  The active is untouched, so a failed or repeated commit just converts
  again. Each conversion writes its own temp file: a `mkfs.erofs` orphaned
  by a killed daemon cannot write into the next one's.
- `committed` (after the metadata transaction), "finalize": rename
  `commit.erofs` to `layer.erofs`, move the upper and work directories to
  the trash, mount the image on `fs`. A thread of the driver deletes what
  went to the trash: deleting a big upper takes as long as converting it,
  and Commit should not wait for that (containerd 2.1's erofs snapshotter
  empties the upper inside Commit).

`layer.erofs` exists only once the metadata says committed, which is what
lets the driver, which never reads metadata, tell layers from actives on
disk. A crash right after the commit transaction leaves a committed
snapshot with only `commit.erofs` and its old upper (which holds the same
files): the next `create` with it as a parent finalizes it.

Where images are mounted, and restarts. `mounts` must not change anything,
so every mount is made before a Mounts call can need it:

- at `committed` (the normal case);
- in `create`, for every parent that is not mounted (crash recovery; a
  parent's root owner is read through its mount, as the overlay driver
  does, to chown the new upper);
- when the driver starts: every `layer.erofs` whose `fs` is not a mount
  point is mounted (after a reboot, or after a clean stop);
- on stop (`close`) every layer mount is unmounted and its mount point
  removed. Running containers are not affected: overlayfs holds private
  clones of its lower mounts (checked: umount of a lower succeeds and the
  overlay keeps working). Removing the mount point means an overlay made
  from a stale Mounts answer while the daemon is down fails with ENOENT
  instead of silently showing empty layers.

A mount is a file-backed erofs mount (Linux 6.12+) or, on ENOTBLK, a
read-only loop device with autoclear (containerd's erofs snapshotter does
the same). Remove and Cleanup unmount below the snapshot directory first
(`Driver._to_trash`).

Mounts (`<x>` abbreviates `<root>/snapshots/<x>`; p0 is the direct parent):

| snapshot               | mounts                                                    |
|------------------------|-----------------------------------------------------------|
| active/view, 0 parents | bind `<id>/fs` [rw or ro, rbind]                          |
| view, 1 parent         | bind `<p0>/fs` [ro, rbind] (the mounted image)            |
| view, >=2 parents      | overlay [lowerdir=<p0>/fs:<p1>/fs:..., extra]             |
| active, >=1 parent     | overlay [workdir=, upperdir=<id>/fs, lowerdir=..., extra] |

containerd's walking differ gets the single `overlay` mount with
`upperdir=` it wants for unpacking and writes each layer straight into the
upper directory, turning OCI whiteouts into overlay whiteouts (character
devices 0/0) and opaque markers into `trusted.overlay.opaque=y`.
`mkfs.erofs` 1.5 keeps both in the image (tested), so the image works as a
lower layer exactly as the directory did. We do not create containerd's
`.erofslayer` marker: containerd 2.1's erofs differ would then write
`layer.erofs` into an active itself, which needs `mkfs.erofs --tar`
(erofs-utils 1.7+) and would break the rule that `layer.erofs` means
committed; without the marker it declines and the walking differ is used.

The raw image list, for VM backends. Prepare or View with the label
`containerd.io/snapshot/polyshim.erofs-images=true` (containerd forwards
`containerd.io/snapshot/*` labels) returns, instead of the above, one
`erofs` mount per parent, nearest parent first (the lowerdir order, and
the order containerd 2.2's erofs snapshotter lists its layer mounts in):
source `<p>/layer.erofs`, options [ro, loop]; then, for an active or a
parentless view, bind `<id>/fs` [rw or ro, rbind], whose overlay workdir is
the sibling `<id>/work`. A VM backend attaches each image as a read-only
disk and assembles the overlay in the guest. These are not one stack of
mounts for one target: containerd's own mount code and polyshim's shim
cannot use them, so the label belongs on a container's snapshot, never on
one containerd unpacks into. Any other value than "true" is refused.

Commit cost. Commit runs inside containerd's metadata write transaction
(spec §1.4), so the conversion stalls containerd's metadata writes for its
duration. Measured with erofs-utils 1.5 on the 2-core Debian 12 test VM
(ext4 root mounted with `discard`, page cache warm, other tests running;
three runs; `tests/test_erofs_driver.py::test_commit_cost_is_measured`
prints the table):

| layer          | Commit | mkfs.erofs+fsync | finalize | delete old upper | image    | overlay |
|----------------|--------|------------------|----------|------------------|----------|---------|
| 1 MiB, 1 file  |  20 ms |  17 ms           |  4 ms    |  5 ms            |  1.0 MiB | 0.2 ms  |
| 50 MiB, 1 file | 290 ms | 290 ms           |  3 ms    |  10-40 ms        | 50.0 MiB | 0.2 ms  |
| 5000 x 1 KiB   | 415 ms | 410 ms           |  3 ms    |  1.3-2.5 s       | 19.9 MiB |  45 ms  |

"Commit" is what the Commit call costs (convert + finalize); the old upper
is deleted afterwards by the driver's thread (on this VM's discard-mounted
ext4 deleting many small files is slow: it would have been the largest
part). "overlay" is the overlay driver's whole commit (measuring the upper).
Conversion cost grows with bytes (the data is copied and fsync'd) and with
file count. `-Enoinline_data` keeps every file's data block-aligned (as
containerd does; DAX and VM disk use like it) at the price of a block per
small file: the 5000-file layer is 6.6 MiB with inline data. containerd
2.1+ can avoid the conversion with its erofs differ, which needs
erofs-utils 1.7+.

Usage. An active's usage is the upper's (walked on demand, as overlay);
the usage recorded at Commit is the upper's as measured just before the
conversion, so Usage does not jump at Commit. (containerd records the
image's disk usage instead; with block-aligned data the two are close:
both take a block per small file.)
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

from daemon.driver import DriverOptions, Probe, disk_usage, fsync, host_lacks, make_dir, run
from daemon.model import Kind, Mount, Snapshot, Usage
from daemon.overlay import OverlayDriver
from shim_framework import _platform as plat
from shim_framework.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("polyshim.snapshotd.erofs")

#: Prepare/View label selecting the raw image list (see the module docstring).
IMAGES_LABEL = "containerd.io/snapshot/polyshim.erofs-images"

LAYER = "layer.erofs"
PENDING = "commit.erofs"
IMAGES_MARKER = "images"
# containerd's commit-time conversion options (internal/erofsutils ConvertErofs).
MKFS_OPTIONS = ("--quiet", "-Enoinline_data")
MKFS_TIMEOUT = 3600  # seconds; a conversion this slow is stuck, not busy
PACKAGE = "erofs-utils"  # Debian's, which has mkfs.erofs


class ErofsDriver(OverlayDriver):
    """Overlay actives and views over committed layers stored as erofs images."""

    name = "erofs"

    def __init__(self, root: Path, options: DriverOptions | None = None) -> None:
        super().__init__(root, options)
        # Serialises mounting and unmounting of layers: `create` (under the store's write
        # lock), `committed` (outside it) and `close` may want the same layer at once.
        self._lock = threading.Lock()
        self._remount_layers()

    @classmethod
    def probe(cls, root: Path) -> Probe:
        """mkfs.erofs, erofs in the kernel, overlay on *root*, and a test image that mounts."""
        missing = "the kernel has no erofs (modprobe erofs; Linux 5.4+)"
        if reason := host_lacks("erofs", missing, ("mkfs.erofs",), PACKAGE):
            return Probe.no(reason)
        overlay = OverlayDriver.probe(root)
        if not overlay.ok:
            return overlay
        failure = f"test erofs image in {root} does not build or mount"
        return cls._probe_mount(Path(root), _mount_test, failure)

    # ------------------------------------------------------------------ the interface

    def create(self, snap: Snapshot, labels: Mapping[str, str]) -> None:
        images = labels.get(IMAGES_LABEL, "")
        if images not in ("", "true"):
            raise InvalidArgument(
                f'label "{IMAGES_LABEL}" is "{images}"; use "true" for the raw image list'
            )
        with self._lock:
            leftovers = [left for parent in snap.parent_ids for left in self._mount_layer(parent)]
        self.deleter.delete(leftovers)
        super().create(snap, labels)
        if images:
            path = self.path(snap.id)
            (path / IMAGES_MARKER).touch(0o600)
            fsync(path)

    def mounts(self, snap: Snapshot) -> list[Mount]:
        if not (self.path(snap.id) / IMAGES_MARKER).exists():
            return super().mounts(snap)
        mounts = [
            Mount("erofs", str(self.layer(p)), options=("ro", "loop")) for p in snap.parent_ids
        ]
        if snap.kind == Kind.ACTIVE or not snap.parent_ids:
            access = "ro" if snap.kind == Kind.VIEW else "rw"
            mounts.append(Mount("bind", str(self.upper(snap.id)), options=(access, "rbind")))
        return mounts

    def convert(self, snap: Snapshot) -> Usage:
        path, upper = self.path(snap.id), self.upper(snap.id)
        usage = disk_usage(upper)
        fd, tmp = tempfile.mkstemp(prefix=f"{PENDING}.tmp-", dir=path)
        os.close(fd)
        try:
            run(["mkfs.erofs", *MKFS_OPTIONS, tmp, str(upper)], PACKAGE, MKFS_TIMEOUT)
            fsync(tmp)
            os.rename(tmp, path / PENDING)  # made durable by `sync`, which Commit calls next
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return usage

    def committed(self, snap: Snapshot) -> None:
        with self._lock:
            leftovers = self._mount_layer(snap.id)
        self.deleter.delete(leftovers)

    def close(self) -> None:
        """Unmount every layer and remove its mount point (see "restarts" above)."""
        super().close()
        with self._lock:
            for sid in self._layer_ids():
                point = self.upper(sid)
                if not os.path.ismount(point):
                    continue
                try:
                    plat.unmount(str(point))
                    point.rmdir()
                except OSError as exc:
                    log.warning("erofs: could not unmount layer %d at %s: %s", sid, point, exc)

    # ------------------------------------------------------------------ helpers

    def layer(self, sid: int) -> Path:
        """The image of committed snapshot *sid*."""
        return self.path(sid) / LAYER

    def _layer_ids(self) -> list[int]:
        ids = []
        for entry in os.scandir(self.snapshots_dir):
            if entry.name.isdigit() and os.path.exists(os.path.join(entry.path, LAYER)):
                ids.append(int(entry.name))
        return sorted(ids)

    def _remount_layers(self) -> None:
        """Start-up: mount every committed layer that is not mounted (after a reboot or stop)."""
        with self._lock:
            for sid in self._layer_ids():
                try:
                    self.deleter.delete(self._mount_layer(sid))
                except (OSError, FailedPrecondition) as exc:
                    # Its children's create retries, and fails there with this error.
                    log.error("erofs: cannot mount layer %d at start-up: %s", sid, exc)

    def _mount_layer(self, sid: int) -> list[Path]:
        """Finalize committed *sid* if its commit left that undone, and mount its image on `fs`.

        Returns what it moved to the trash (the old upper and work directories),
        for the caller to delete when it has time. Call with `_lock` held."""
        path, point = self.path(sid), self.upper(sid)
        image = self.layer(sid)
        if not image.exists():
            pending = path / PENDING
            if not pending.exists():
                raise FailedPrecondition(
                    f"erofs: committed snapshot {sid} has no image ({image} and {pending} are "
                    "missing); remove it and unpack the layer again"
                )
            os.rename(pending, image)
            fsync(path)
        if os.path.ismount(point):
            return []
        moved = []
        if os.path.lexists(point) and not _empty_dir(point):
            moved.append(self._set_aside(point, sid))
        if os.path.lexists(self.work(sid)):
            moved.append(self._set_aside(self.work(sid), sid))
        for entry in path.glob(f"{PENDING}.tmp-*"):
            entry.unlink(missing_ok=True)  # from conversions a crash interrupted
        make_dir(point, 0o755, exist_ok=True)
        _mount_image(image, point)
        return moved

    def _set_aside(self, path: Path, sid: int) -> Path:
        target = self.trash_dir / f"{sid}-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, target)
        return target


def _mount_image(image: Path, point: Path) -> None:
    """Mount erofs *image* read-only on *point*: file-backed, else through a loop device."""
    try:
        plat.mount(str(image), str(point), "erofs", plat.MS_RDONLY, "")
    except OSError as exc:
        if exc.errno != errno.ENOTBLK:  # before Linux 6.12 erofs mounts block devices only
            raise
        with plat.attach_loop(str(image), readonly=True) as device:
            plat.mount(device, str(point), "erofs", plat.MS_RDONLY, "")


def _empty_dir(path: Path) -> bool:
    if path.is_symlink() or not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _mount_test(td: Path) -> None:
    """Build a one-file erofs image in empty directory *td*, mount it, read it, unmount it."""
    (td / "src").mkdir()
    (td / "src" / "probe").write_text("erofs\n")
    (td / "mnt").mkdir()
    run(
        ["mkfs.erofs", *MKFS_OPTIONS, str(td / "probe.erofs"), str(td / "src")],
        PACKAGE,
        MKFS_TIMEOUT,
    )
    _mount_image(td / "probe.erofs", td / "mnt")
    try:
        if (td / "mnt" / "probe").read_text() != "erofs\n":
            raise OSError(errno.EIO, "the test image reads back wrong")
    finally:
        plat.unmount(str(td / "mnt"))
