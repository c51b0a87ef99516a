"""What the erofs driver does beyond the conformance suite: images, whiteouts, mounts, costs.

The conformance suite (`test_snapshotter_conformance.py`) runs the driver
through every snapshot rule with real mounts; here are the parts only erofs
has: committed layers become `layer.erofs` images mounted on the host,
overlay whiteouts and opaque directories survive the conversion, the raw
image list for VM backends, mounting across restarts and interrupted
commits, and the commit cost (printed; `-s` shows it).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.driver import disk_usage
from daemon.erofs import IMAGES_LABEL, LAYER, PENDING, ErofsDriver
from daemon.model import Kind, Mount, Snapshot
from daemon.overlay import OverlayDriver
from shim_framework import _platform as plat
from shim_framework.errors import InvalidArgument
from shim_framework.mounts import mount_all, unmount_all
from tests.harness.requirements import require_binary, require_root
from tests.harness.snapshotd import (
    InProcessSnapshotd,
    SnapshotClient,
    remove_tree,
    short_tempdir,
)

NAME = "test-erofs"


@pytest.fixture
def snapd() -> Iterator[InProcessSnapshotd]:
    """The daemon serving one erofs snapshotter, in this process."""
    require_root()
    require_binary("mkfs.erofs")
    daemon = InProcessSnapshotd({NAME: ErofsDriver})
    try:
        yield daemon
    finally:
        daemon.close()
        remove_tree(daemon.base)


@pytest.fixture
def sn(snapd: InProcessSnapshotd) -> Iterator[SnapshotClient]:
    client = snapd.client(NAME)
    yield client
    client.close()


@pytest.fixture
def driver(snapd: InProcessSnapshotd) -> ErofsDriver:
    found = snapd.daemon.snapshotters[NAME].driver
    assert isinstance(found, ErofsDriver)
    return found


@pytest.fixture
def work(snapd: InProcessSnapshotd) -> Path:
    path = snapd.base / "work"
    path.mkdir()
    return path


@contextlib.contextmanager
def mounted(mounts: list[Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount_all(target)


def fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at *path* (the top one), if anything is."""
    real = os.path.realpath(path)
    return next((m.fstype for m in reversed(plat.mount_table()) if m.point == real), None)


def upperdir(mounts: list[Mount]) -> Path:
    option = next(o for o in mounts[0].options if o.startswith("upperdir="))
    return Path(option.split("=", 1)[1])


def commit_layer(sn: SnapshotClient, work: Path, name: str, parent: str, files: dict) -> None:
    """Prepare on *parent*, write *files* (path -> bytes) through the mounts, commit *name*."""
    with mounted(sn.prepare(f"{name}-a", parent), work / f"{name}-a") as root:
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
    sn.commit(name, f"{name}-a")


def snapshot_id(snapd: InProcessSnapshotd, key: str) -> int:
    with snapd.daemon.snapshotters[NAME].store.transaction(write=False) as tx:
        return tx.get_info(key)[0]


# ---------------------------------------------------------------------- images and whiteouts


def test_committed_layer_is_a_mounted_erofs_image(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: ErofsDriver, work: Path
):
    """After Commit the layer is layer.erofs, mounted read-only on fs; the upper is gone."""
    commit_layer(sn, work, "base", "", {"etc/hostname": b"erofs\n"})
    sid = snapshot_id(snapd, "base")
    path = driver.path(sid)
    assert sorted(os.listdir(path)) == ["fs", LAYER]
    assert fstype(path / "fs") == "erofs"
    assert (path / "fs" / "etc" / "hostname").read_bytes() == b"erofs\n"
    with pytest.raises(OSError):
        (path / "fs" / "new").write_text("x")
    # The old upper and work dirs went to the trash, where a thread of the driver deletes them.
    assert all(entry.startswith(f"{sid}-") for entry in os.listdir(driver.trash_dir))
    driver.purge()
    assert os.listdir(driver.trash_dir) == []


def test_whiteouts_and_opaque_directories_survive_conversion(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: ErofsDriver, work: Path
):
    """A whiteout (char 0/0) and an opaque dir, written as the walking differ writes them into
    the upperdir, are in the image and hide the lower layer's files under overlay."""
    commit_layer(
        sn, work, "lower", "",
        {"keep": b"keep\n", "gone": b"gone\n", "dir/old": b"old\n", "dir/also-old": b"old\n"},
    )  # fmt: skip
    mounts = sn.prepare("upper-a", "lower")
    assert mounts[0].type == "overlay"  # one overlay mount with upperdir=: no mount to unpack
    upper = upperdir(mounts)
    os.mknod(upper / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # what the applier writes
    (upper / "dir").mkdir()
    os.setxattr(upper / "dir", "trusted.overlay.opaque", b"y")
    (upper / "dir" / "new").write_bytes(b"new\n")
    sn.commit("upper", "upper-a")

    image_root = driver.path(snapshot_id(snapd, "upper")) / "fs"
    assert fstype(image_root) == "erofs"
    st = os.lstat(image_root / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(image_root / "dir", "trusted.overlay.opaque") == b"y"

    with mounted(sn.view("v", "upper"), work / "v") as root:
        assert sorted(os.listdir(root)) == ["dir", "keep"]
        assert os.listdir(root / "dir") == ["new"]
    sn.remove("v")
    # One more layer on top: the whiteouts keep working from a lower erofs layer too.
    commit_layer(sn, work, "top", "upper", {"top": b"top\n"})
    with mounted(sn.view("v2", "top"), work / "v2") as root:
        assert sorted(os.listdir(root)) == ["dir", "keep", "top"]
        assert os.listdir(root / "dir") == ["new"]
        assert not os.path.lexists(root / "gone")
    sn.remove("v2")


def test_raw_image_list_for_vm_backends(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: ErofsDriver, work: Path
):
    """With the label, Prepare/View/Mounts list each parent's image (nearest first) and the
    upper; each image mounts alone, and stacked they equal the ordinary view."""
    commit_layer(sn, work, "l0", "", {"a": b"0\n", "b": b"0\n"})
    commit_layer(sn, work, "l1", "l0", {"b": b"1\n", "c": b"1\n"})
    images = {IMAGES_LABEL: "true"}
    p0, p1 = (driver.layer(snapshot_id(snapd, k)) for k in ("l0", "l1"))

    active = sn.prepare("raw-active", "l1", images)
    upper = driver.upper(snapshot_id(snapd, "raw-active"))
    assert active == [
        Mount("erofs", str(p1), options=("ro", "loop")),
        Mount("erofs", str(p0), options=("ro", "loop")),
        Mount("bind", str(upper), options=("rw", "rbind")),
    ]
    assert sn.mounts("raw-active") == active
    assert (upper.parent / "work").is_dir()  # the workdir a guest's overlay needs, beside it
    view = sn.view("raw-view", "l1", images)
    assert view == active[:2]
    assert sn.view("raw-one", "l0", images) == [Mount("erofs", str(p0), options=("ro", "loop"))]
    bare = sn.view("raw-bare", "", images)
    assert bare == [Mount("bind", bare[0].source, options=("ro", "rbind"))]

    # What a VM backend does: attach every image on its own, stack them in the guest.
    with contextlib.ExitStack() as stack:
        lowers = [stack.enter_context(mounted([m], work / f"disk{i}")) for i, m in enumerate(view)]
        merged = work / "merged"
        merged.mkdir()
        plat.mount("overlay", str(merged), "overlay", 0, "lowerdir=" + ":".join(map(str, lowers)))
        stack.callback(unmount_all, merged)
        with mounted(sn.view("plain", "l1"), work / "plain") as plain:
            assert (
                {f: (merged / f).read_bytes() for f in os.listdir(merged)}
                == {f: (plain / f).read_bytes() for f in os.listdir(plain)}
                == {"a": b"0\n", "b": b"1\n", "c": b"1\n"}
            )


def test_raw_image_list_label_takes_only_true(sn: SnapshotClient, driver: ErofsDriver):
    """Any other label value is InvalidArgument naming the label, and leaves nothing behind."""
    with pytest.raises(InvalidArgument, match=r"polyshim\.erofs-images"):
        sn.prepare("k", "", {IMAGES_LABEL: "yes"})
    assert sn.list() == []
    assert os.listdir(driver.snapshots_dir) == []


# ---------------------------------------------------------------------- restarts and crashes


def test_layers_are_unmounted_on_stop_and_mounted_on_start(
    sn: SnapshotClient, snapd: InProcessSnapshotd, work: Path
):
    """A clean stop leaves nothing mounted and no mount point; the next start mounts again."""
    commit_layer(sn, work, "base", "", {"hello": b"hello\n"})
    mounts = sn.prepare("top", "base")
    sid = snapshot_id(snapd, "base")
    sn.close()
    snapd.close()
    layer_fs = snapd.root / NAME / "snapshots" / str(sid) / "fs"
    assert fstype(layer_fs) is None and not layer_fs.exists()
    # A stale overlay made meanwhile fails loudly instead of showing an empty layer.
    with (
        pytest.raises(InvalidArgument, match="No such file or directory"),
        mounted(mounts, work / "stale"),
    ):
        pass

    again = InProcessSnapshotd({NAME: ErofsDriver}, base=snapd.base)
    try:
        assert fstype(layer_fs) == "erofs"
        client = again.client(NAME)
        with mounted(client.mounts("top"), work / "top") as root:
            assert (root / "hello").read_bytes() == b"hello\n"
        client.close()
    finally:
        again.close()


def test_running_overlay_survives_a_stop(sn: SnapshotClient, snapd: InProcessSnapshotd, work: Path):
    """Stopping the daemon unmounts the layers, yet a container's mounted rootfs keeps working."""
    commit_layer(sn, work, "base", "", {"hello": b"hello\n"})
    with mounted(sn.prepare("top", "base"), work / "top") as root:
        sn.close()
        snapd.close()
        assert (root / "hello").read_bytes() == b"hello\n"
        (root / "written").write_text("after the stop\n")


def test_interrupted_commit_is_finished_by_the_next_prepare(tmp_path: Path):
    """A commit whose post-commit step never ran (a crash) is finalized when a child needs it;
    an active that was converted but not committed is never mounted over."""
    require_root()
    require_binary("mkfs.erofs")
    root = short_tempdir()
    try:
        d = ErofsDriver(root / "erofs")
        d.create(Snapshot(1, Kind.ACTIVE), {})
        (d.upper(1) / "file").write_text("one\n")
        d.convert(Snapshot(1, Kind.ACTIVE))  # then the daemon dies: committed() never runs
        assert (d.path(1) / PENDING).exists() and not d.layer(1).exists()
        d.close()

        d = ErofsDriver(root / "erofs")  # restart: 1 might still be an active; leave it alone
        assert fstype(d.upper(1)) is None
        assert (d.upper(1) / "file").read_text() == "one\n"

        # The metadata said committed after all: the child's create finalizes the parent.
        d.create(Snapshot(2, Kind.VIEW, (1,)), {})
        assert d.layer(1).exists() and not (d.path(1) / PENDING).exists()
        assert fstype(d.upper(1)) == "erofs"
        assert not d.work(1).exists()
        assert sorted(os.listdir(d.path(1))) == ["fs", LAYER]  # old upper and work: trash
        with mounted(d.mounts(Snapshot(2, Kind.VIEW, (1,))), tmp_path / "v") as view:
            assert (view / "file").read_text() == "one\n"
        d.purge()
        assert os.listdir(d.trash_dir) == []
        d.close()
    finally:
        remove_tree(root)


# ---------------------------------------------------------------------- probe and cost


def test_probe_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Here the driver can run; without mkfs.erofs on PATH the probe says so."""
    require_root()
    require_binary("mkfs.erofs")
    assert ErofsDriver.probe(tmp_path / "root").ok
    monkeypatch.setenv("PATH", str(tmp_path))
    probe = ErofsDriver.probe(tmp_path / "root")
    assert not probe.ok and "mkfs.erofs" in probe.reason


def _fill(root: Path, layer: str) -> None:
    if layer == "1 file of 1 MiB":
        (root / "one").write_bytes(os.urandom(1 << 20))
    elif layer == "1 file of 50 MiB":
        (root / "big").write_bytes(os.urandom(50 << 20))
    else:
        for d in range(50):
            (root / f"d{d}").mkdir()
            for f in range(100):
                (root / f"d{d}" / f"f{f}").write_bytes(b"x" * 1024)


COST_LAYERS = ["1 file of 1 MiB", "1 file of 50 MiB", "5000 files of 1 KiB"]


def test_commit_cost_is_measured(tmp_path: Path):
    """Time Commit's parts for three layer shapes, against overlay's commit (printed)."""
    require_root()
    require_binary("mkfs.erofs")
    root = short_tempdir()
    rows = []
    try:
        erofs, overlay = ErofsDriver(root / "erofs"), OverlayDriver(root / "overlay")
        for sid, layer in enumerate(COST_LAYERS, 1):
            active = Snapshot(sid, Kind.ACTIVE)
            erofs.create(active, {})
            _fill(erofs.upper(sid), layer)
            overlay.create(active, {})
            _fill(overlay.upper(sid), layer)
            os.sync()  # time the commit, not the writeback of the test data

            t0 = time.perf_counter()
            erofs.convert(active)
            t1 = time.perf_counter()
            erofs.committed(Snapshot(sid, Kind.COMMITTED))
            t2 = time.perf_counter()
            erofs.purge()  # the old upper, which the driver's thread deletes after Commit
            t3 = time.perf_counter()
            overlay.convert(active)
            t4 = time.perf_counter()

            assert fstype(erofs.upper(sid)) == "erofs"
            image = disk_usage(erofs.layer(sid)).size
            rows.append((layer, t2 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, image))
            assert t2 - t0 < 60, f"{layer}: erofs commit took {t2 - t0:.1f}s"
        erofs.close()
    finally:
        remove_tree(root)
    print("\nerofs commit cost: convert = mkfs.erofs + fsync, finalize = rename + mount,")
    print("delete = removing the old upper after Commit; overlay = overlay's whole commit")
    print(
        f"{'layer':<22}{'Commit':>9}{'convert':>9}{'finalize':>9}{'delete':>9}{'overlay':>9}"
        f"{'image':>11}"
    )
    for layer, total, convert, finalize, delete, ov, image in rows:
        ms = [f"{t * 1000:>7.0f}ms" for t in (total, convert, finalize, delete)]
        print(f"{layer:<22}{''.join(ms)}{ov * 1000:>7.1f}ms{image / (1 << 20):>8.1f}MiB")
