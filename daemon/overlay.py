"""The overlay driver: one directory per snapshot, overlayfs to stack them.

Layout (as containerd's overlayfs snapshotter, `plugins/snapshots/overlay`):

    <root>/snapshots/<id>/fs     0755  the layer's files; an active's upperdir
    <root>/snapshots/<id>/work   0711  overlay workdir (actives only)

Mounts, exactly the forms containerd's overlayfs snapshotter returns (spec
§3.2), so that containerd's applier writes layers straight into the upperdir
(one `overlay` mount with `upperdir=`: no mount at all during unpack) and its
mount code handles our mounts as it handles its own:

| snapshot              | mount                                                        |
|-----------------------|--------------------------------------------------------------|
| active/view, 0 parents| bind `<id>/fs` [rw or ro, rbind]                             |
| view, 1 parent        | bind `<parent>/fs` [ro, rbind]                               |
| view, >=2 parents     | overlay [lowerdir=<p0>/fs:<p1>/fs:..., extra]                |
| active, >=1 parent    | overlay [workdir=, upperdir=, lowerdir=, extra]              |

Option order is containerd 2.x's: work/upper/lower first, then the configured
`mount_options`, then `userxattr` and `index=off` unless configured (the
kernel takes the last of repeated options). 1.6.20 put index=off/userxattr
first; the kernel does not care, and containerd's own code finds
`upperdir=`/`lowerdir=` by prefix wherever they are.

- `index=off` when the kernel has the overlay `index` parameter: with the
  index on, overlayfs records the upper/lower it was first mounted with and
  refuses a remount with a different stack (issue containerd#2187).
- `userxattr` only inside a user namespace, not on tmpfs, on Linux >= 5.11
  (containerd `overlayutils.NeedsUserXAttr`; older kernels would need a probe
  mount, and we assume no). `volatile` is never added: containerd's
  snapshotter does not either, only its temporary mounts strip it.
- Many layers: lowerdir strings of 128 layers exceed a page. Whoever mounts
  copes: containerd (1.6.20 already: `mount/mount_linux.go`
  `compactLowerdirOption`, in a child chdir'd to the common parent of the
  lowerdirs) and polyshim's shim (`shim_framework/mounts.py`) both make the
  lowerdirs relative to `<root>/snapshots`, which works because every layer
  sits side by side there as `<id>/fs`. The kernel stacks at most 500 lowers.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path

from daemon.driver import Driver, DriverOptions, Probe, disk_usage, host_lacks, make_dir
from daemon.model import Kind, Mount, Snapshot, Usage
from shim_framework import _platform as plat
from shim_framework import mounts

log = logging.getLogger("polyshim.snapshotd.overlay")

_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")
# Characters that would split or escape an overlay option: refused in the root path.
_OPTION_SEPARATORS = (",", ":", "\\", "=")


class OverlayDriver(Driver):
    """Directories and overlayfs, as containerd's own overlayfs snapshotter."""

    name = "overlay"

    def __init__(self, root: Path, options: DriverOptions | None = None) -> None:
        bad = [c for c in _OPTION_SEPARATORS if c in str(root)]
        if bad:
            raise ValueError(
                f"overlay root {str(root)!r} contains {bad[0]!r}, which overlay mount options "
                "cannot carry; choose another --root"
            )
        super().__init__(root, options)
        configured = list(self.options.mount_options)
        extra = list(configured)
        if not _has_option(configured, "userxattr") and needs_userxattr(self.root):
            extra.append("userxattr")
        if not _has_option(configured, "index") and _INDEX_PARAMETER.exists():
            extra.append("index=off")
        self.extra_options = tuple(extra)

    @classmethod
    def probe(cls, root: Path) -> Probe:
        """overlayfs must be in the kernel and mountable with layers on *root*'s filesystem."""
        if reason := host_lacks("overlay", "the kernel has no overlayfs (modprobe overlay)"):
            return Probe.no(reason)
        return cls._probe_mount(Path(root), _mount_test, f"test overlay mount in {root} failed")

    def create(self, snap: Snapshot, labels: Mapping[str, str]) -> None:
        path = self._clear_leftover(snap.id)
        make_dir(path, 0o700)
        make_dir(path / "fs", 0o755)
        if snap.kind == Kind.ACTIVE:
            make_dir(path / "work", 0o711)
        if snap.parent_ids:
            # The layer root belongs to whoever owns the parent's root (a chowned image root).
            st = os.stat(self.upper(snap.parent_ids[0]))
            os.lchown(path / "fs", st.st_uid, st.st_gid)

    def mounts(self, snap: Snapshot) -> list[Mount]:
        if not snap.parent_ids:
            access = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.upper(snap.id)), options=(access, "rbind"))]
        if snap.kind == Kind.VIEW and len(snap.parent_ids) == 1:
            return [Mount("bind", str(self.upper(snap.parent_ids[0])), options=("ro", "rbind"))]
        options = []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.work(snap.id)}", f"upperdir={self.upper(snap.id)}"]
        options.append("lowerdir=" + ":".join(str(self.upper(p)) for p in snap.parent_ids))
        options += self.extra_options
        return [Mount("overlay", "overlay", options=tuple(options))]

    def convert(self, snap: Snapshot) -> Usage:
        return disk_usage(self.upper(snap.id))

    def usage(self, snap: Snapshot) -> Usage:
        if snap.kind != Kind.ACTIVE:
            return Usage()
        return disk_usage(self.upper(snap.id))

    def upper(self, sid: int) -> Path:
        return self.path(sid) / "fs"

    def work(self, sid: int) -> Path:
        return self.path(sid) / "work"


def _has_option(options: list[str], name: str) -> bool:
    return any(o == name or o.startswith(name + "=") for o in options)


def in_user_namespace() -> bool:
    """True unless this process maps the whole uid range 1:1 (the initial user namespace)."""
    try:
        fields = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def needs_userxattr(root: Path) -> bool:
    """Whether overlay mounts below *root* need `userxattr` (see the module docstring)."""
    if not in_user_namespace():
        return False
    if _on_tmpfs(root):
        return False  # tmpfs refuses userxattr (tmpfs(5))
    release = platform.release().split(".")
    try:
        major, minor = int(release[0]), int(release[1].split("-")[0])
    except (IndexError, ValueError):
        return False
    if (major, minor) >= (5, 11):
        return True
    log.warning(
        "overlay: in a user namespace on Linux %s; assuming no userxattr", platform.release()
    )
    return False


def _on_tmpfs(path: Path) -> bool:
    """Whether *path* is on tmpfs (from the mount table; statfs's f_type is not in Python)."""
    mount = mounts.containing(path)
    return mount is not None and mount.fstype == "tmpfs"


def _mount_test(td: Path) -> None:
    """Mount a two-layer overlay with an upper in empty directory *td*, then unmount it."""
    for d in ("lower1", "lower2", "upper", "work", "merged"):
        (td / d).mkdir()
    data = f"lowerdir={td}/lower1:{td}/lower2,upperdir={td}/upper,workdir={td}/work"
    plat.mount("overlay", str(td / "merged"), "overlay", 0, data)
    plat.unmount(str(td / "merged"))
