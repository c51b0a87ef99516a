"""What the blockfile driver does beyond the conformance suite: images, copies, journals, size.

The conformance suite (`test_snapshotter_conformance.py`) runs the driver
through every snapshot rule with real loop mounts; here are the parts only
blockfile has: the scratch image, sparse and reflinked copies (on a loop-
mounted XFS image made for the test), what Usage counts, commit of images
that were not cleanly unmounted, and the configurable size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemon.blockfile as blockfile
import daemon.driver
from daemon.blockfile import (
    DEFAULT_SIZE,
    BlockfileDriver,
    copy_image,
    loop_device_of,
    make_image,
    read_superblock,
)
from daemon.driver import DriverOptions
from daemon.model import Kind, Mount, Snapshot
from shim_framework import _platform as plat
from shim_framework.errors import FailedPrecondition, PolyshimError
from shim_framework.mounts import containing, mount_all, unmount_all
from tests.harness.requirements import require_binary, require_root
from tests.harness.snapshotd import (
    InProcessSnapshotd,
    SnapshotClient,
    remove_tree,
    short_tempdir,
)

NAME = "test-blockfile"
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def snapd() -> Iterator[InProcessSnapshotd]:
    """The daemon serving one blockfile snapshotter (default size), in this process."""
    require_root()
    require_binary("mkfs.ext4")
    daemon = InProcessSnapshotd({NAME: BlockfileDriver})
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
def driver(snapd: InProcessSnapshotd) -> BlockfileDriver:
    found = snapd.daemon.snapshotters[NAME].driver
    assert isinstance(found, BlockfileDriver)
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


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fs_type_of(path: Path) -> str:
    """The type of the filesystem *path* is on."""
    mount = containing(path)
    assert mount is not None
    return mount.fstype


def snapshot_id(snapd: InProcessSnapshotd, key: str) -> int:
    with snapd.daemon.snapshotters[NAME].store.transaction(write=False) as tx:
        return tx.get_info(key)[0]


# ---------------------------------------------------------------------- images and copies


def test_scratch_is_an_empty_sparse_ext4_image(driver: BlockfileDriver, work: Path):
    """64 MiB of ext4 in well under 1 MiB of disk; root 0755 owned by root, no lost+found."""
    assert driver.scratch.stat().st_size == DEFAULT_SIZE == 64 * MiB
    assert allocated(driver.scratch) < 1 * MiB
    sb = read_superblock(driver.scratch)
    assert sb is not None and sb.clean and not sb.needs_recovery
    with mounted([Mount("ext4", str(driver.scratch), options=("loop", "ro"))], work / "s") as root:
        st = os.stat(root)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
        assert os.listdir(root) == []


def test_child_copy_keeps_holes_on_ext4(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: BlockfileDriver, work: Path
):
    """A child of a 64 MiB image holding a few KiB occupies what its parent does, not 64 MiB."""
    with mounted(sn.prepare("base-a", ""), work / "base") as root:
        (root / "few").write_bytes(os.urandom(8 * KiB))
    sn.commit("base", "base-a")
    parent = driver.path(snapshot_id(snapd, "base"))
    sn.prepare("child", "base")
    child = driver.path(snapshot_id(snapd, "child"))
    print(f"\nparent occupies {allocated(parent) // KiB} KiB, child {allocated(child) // KiB} KiB")
    assert os.stat(child).st_size == 64 * MiB
    assert allocated(child) <= allocated(parent) + 64 * KiB
    assert allocated(child) < 1 * MiB
    with mounted(sn.mounts("child"), work / "child") as root:
        assert len((root / "few").read_bytes()) == 8 * KiB


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A mounted ext4 filesystem (no reflink), in a sparse image file."""
    require_root()
    mkfs = require_binary("mkfs.ext4")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run([mkfs, "-q", "-F", str(image)], check=True)
    point = tmp_path / "ext4"
    point.mkdir()
    with plat.attach_loop(str(image), readonly=False) as device:
        plat.mount(device, str(point), "ext4", 0, "")
    try:
        yield point
    finally:
        unmount_all(point)


def test_copy_falls_back_to_sparse_copy_without_reflink(ext4: Path):
    """On ext4 (no reflink) copy_image copies data extents only, byte for byte."""
    assert fs_type_of(ext4) == "ext4"
    tmp_path = ext4
    source = tmp_path / "src"
    with open(source, "wb") as f:
        f.truncate(32 * MiB)
        for offset in (0, 5 * MiB + 123, 31 * MiB):
            f.seek(offset)
            f.write(os.urandom(10 * KiB))
    assert copy_image(source, tmp_path / "dst") == "sparse"
    assert (tmp_path / "dst").read_bytes() == source.read_bytes()
    assert allocated(tmp_path / "dst") <= allocated(source) + 16 * KiB
    with pytest.raises(FileExistsError):
        copy_image(source, tmp_path / "dst")  # never over an existing file


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A mounted XFS filesystem with reflink, in a sparse image file."""
    require_root()
    mkfs = require_binary("mkfs.xfs")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(320 * MiB)  # mkfs.xfs 6.x refuses less than 300 MiB
    subprocess.run([mkfs, "-q", "-m", "reflink=1", str(image)], check=True)
    point = tmp_path / "xfs"
    point.mkdir()
    with plat.attach_loop(str(image), readonly=False) as device:
        plat.mount(device, str(point), "xfs", 0, "")
    try:
        yield point
    finally:
        unmount_all(point)


def test_copy_is_a_reflink_where_the_filesystem_can(xfs: Path):
    """On XFS with reflink, images share extents: the copy takes no data blocks of its own."""
    driver = BlockfileDriver(xfs / "root")
    try:
        active = Snapshot(1, Kind.ACTIVE)
        driver.create(active, {})
        with mounted(driver.mounts(active), xfs / "m"):
            (xfs / "m" / "data").write_bytes(os.urandom(4 * MiB))
        driver.convert(active)
        free_before = shutil.disk_usage(xfs).free
        assert copy_image(driver.path(1), driver.path(2)) == "reflink"
        assert shutil.disk_usage(xfs).free >= free_before - 256 * KiB
        extents = subprocess.run(
            ["filefrag", "-v", str(driver.path(2))], capture_output=True, text=True, check=True
        ).stdout
        assert "shared" in extents
        # And through the driver: a child of 1 is a reflink too, with 1's data.
        child = Snapshot(3, Kind.ACTIVE, (1,))
        driver.create(child, {})
        with mounted(driver.mounts(child), xfs / "m"):
            assert len((xfs / "m" / "data").read_bytes()) == 4 * MiB
    finally:
        driver.close()


# ---------------------------------------------------------------------- mounts and usage


def test_views_mount_their_parents_image_read_only(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: BlockfileDriver
):
    """A view with parents copies nothing; one without mounts its own empty copy of scratch."""
    sn.prepare("base-a", "")
    sn.commit("base", "base-a")
    parent = driver.path(snapshot_id(snapd, "base"))
    assert sn.view("v", "base") == [Mount("ext4", str(parent), options=("loop", "ro"))]
    assert driver.path(snapshot_id(snapd, "v")).stat().st_size == 0
    bare = sn.view("bare", "")
    own = driver.path(snapshot_id(snapd, "bare"))
    assert bare == [Mount("ext4", str(own), options=("loop", "ro"))]
    assert sn.prepare("a", "base") == [
        Mount("ext4", str(driver.path(snapshot_id(snapd, "a"))), options=("loop", "rw"))
    ]


def test_usage_counts_the_layers_own_data(sn: SnapshotClient, work: Path):
    """Usage is what the image holds beyond its parent: bytes on disk and inodes in use."""
    with mounted(sn.prepare("base-a", ""), work / "base") as root:
        (root / "big").write_bytes(os.urandom(1 * MiB))
    sn.commit("base", "base-a")
    base = sn.usage("base")
    assert base.size >= 1 * MiB
    with mounted(sn.prepare("top-a", "base"), work / "top") as root:
        (root / "small").write_bytes(b"x" * 4 * KiB)
        (root / "dir").mkdir()
    top = sn.usage("top-a")
    assert 4 * KiB <= top.size < 256 * KiB
    assert top.inodes == 2
    sn.commit("top", "top-a")
    assert sn.usage("top") == top
    sn.view("v", "top")
    assert sn.usage("v").size == 0


def test_commit_fsyncs_the_image_once(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: BlockfileDriver,
    monkeypatch: pytest.MonkeyPatch,
):  # fmt: skip
    """Commit syncs the image (measuring usage needs that anyway) and snapshots/, once each."""
    sn.prepare("a", "")
    image = driver.path(snapshot_id(snapd, "a"))
    synced: list[str] = []
    real = blockfile.fsync

    def recording(path: Path | str) -> None:
        synced.append(str(path))
        real(path)

    monkeypatch.setattr(blockfile, "fsync", recording)
    monkeypatch.setattr(daemon.driver, "fsync", recording)  # Driver.sync's, if inherited
    sn.commit("c", "a")
    assert sorted(synced) == sorted([str(image), str(driver.snapshots_dir)])


# ---------------------------------------------------------------------- journals


def _dirty_copy(driver: BlockfileDriver, sid: int, work: Path) -> None:
    """Replace the image of *sid* by a copy taken while it was mounted with a fresh write
    in its journal (what a crash of the host leaves behind)."""
    image = driver.path(sid)
    with mounted([Mount("ext4", str(image), options=("loop", "rw"))], work / "dirty") as root:
        (root / "journaled").write_text("in the journal\n")
        os.sync()  # the transaction reaches the journal; the checkpoint does not yet
        shutil.copyfile(image, work / "crashed.img")
        os.rename(work / "crashed.img", image)  # the loop device keeps the old inode
    sb = read_superblock(image)
    assert sb is not None and sb.needs_recovery


def test_commit_replays_a_journal_that_needs_recovery(
    sn: SnapshotClient, snapd: InProcessSnapshotd, driver: BlockfileDriver, work: Path
):
    """An image left needing recovery would not mount read-only; Commit repairs it first."""
    sn.prepare("a", "")
    sid = snapshot_id(snapd, "a")
    _dirty_copy(driver, sid, work)
    shutil.copyfile(driver.path(sid), work / "unrepaired.img")
    unrepaired = [Mount("ext4", str(work / "unrepaired.img"), options=("loop", "ro"))]
    with pytest.raises(PolyshimError) as caught, mounted(unrepaired, work / "u"):
        pass
    assert "Read-only file system" in str(caught.value)  # ext4: "recovery required"
    sn.commit("c", "a")
    sb = read_superblock(driver.path(sid))
    assert sb is not None and sb.clean and not sb.needs_recovery
    with mounted(sn.view("v", "c"), work / "v") as root:
        assert (root / "journaled").read_text() == "in the journal\n"


def test_commit_of_a_mounted_image_is_refused(
    sn: SnapshotClient, driver: BlockfileDriver, work: Path, monkeypatch: pytest.MonkeyPatch
):
    """Committing an image that is still mounted read-write fails and changes nothing."""
    monkeypatch.setattr(blockfile, "DETACH_WAIT", 0.2)
    with mounted(sn.prepare("a", ""), work / "a") as root:
        (root / "f").write_text("x\n")
        with pytest.raises(FailedPrecondition, match="unmount"):
            sn.commit("c", "a")
        assert sn.stat("a").kind == Kind.ACTIVE
    sn.commit("c", "a")
    assert sn.stat("c").kind == Kind.COMMITTED


# ---------------------------------------------------------------------- size and probe


def test_size_is_configurable(tmp_path: Path):
    """--blockfile-size sizes new parentless images; changing it leaves old snapshots alone."""
    require_root()
    require_binary("mkfs.ext4")
    root = short_tempdir()
    try:
        small = BlockfileDriver(root / "bf", DriverOptions(blockfile_size=16 * MiB))
        small.create(Snapshot(1, Kind.ACTIVE), {})
        assert small.path(1).stat().st_size == 16 * MiB
        with mounted(small.mounts(Snapshot(1, Kind.ACTIVE)), tmp_path / "m") as mnt:
            total = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
            assert 12 * MiB < total <= 16 * MiB
        small.close()

        bigger = BlockfileDriver(root / "bf", DriverOptions(blockfile_size=32 * MiB))
        assert bigger.scratch.stat().st_size == 32 * MiB
        assert bigger.path(1).stat().st_size == 16 * MiB
        bigger.create(Snapshot(2, Kind.ACTIVE, (1,)), {})  # a child keeps its parent's size
        assert bigger.path(2).stat().st_size == 16 * MiB
        assert sorted(os.listdir(root / "bf")) == ["scratch", "snapshots", "trash"]
        bigger.close()
    finally:
        remove_tree(root)


def test_make_image_without_e2fsprogs_names_the_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A missing tool is FailedPrecondition naming it; the probe says the same."""
    require_root()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FailedPrecondition, match=r"mkfs\.ext4"):
        make_image(tmp_path / "img", 4 * MiB)
    probe = BlockfileDriver.probe(tmp_path / "root")
    assert not probe.ok and "mkfs.ext4" in probe.reason


def test_probe_passes_here(tmp_path: Path):
    """With e2fsprogs, ext4 and loop devices the driver can run; its test image is gone after."""
    require_root()
    require_binary("mkfs.ext4")
    assert BlockfileDriver.probe(tmp_path / "root").ok
    assert os.listdir(tmp_path / "root") == []
    assert loop_device_of(tmp_path / "root") is None
