"""Rootfs mounts for real, as root: bind, overlay, erofs, ext4 on loop, cleanup and failures."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim_framework import _platform as plat
from shim_framework.backend import Mount
from shim_framework.errors import InvalidArgument
from shim_framework.mounts import containing, mount_all, parse_options, points_below, unmount_all
from tests.harness.requirements import require_binary, require_root


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices bound to *image*, from /sys/block/loopN/loop/backing_file."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip() == str(image.resolve()):
                found.append(backing.parent.parent.name)
        except OSError:
            pass  # detached meanwhile
    return found


def assert_loop_freed(image: Path) -> None:
    """Autoclear may finish just after umount returns; give the kernel a moment."""
    deadline = time.monotonic() + 10
    while loop_devices_of(image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_devices_of(image) == [], f"loop device of {image} was not freed"


def tree(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Path]:
    """An empty rootfs directory; whatever a test leaves mounted below tmp_path goes after."""
    require_root()
    path = tmp_path / "bundle" / "rootfs"
    path.mkdir(parents=True)
    yield path
    unmount_all(tmp_path)
    assert points_below(tmp_path) == []


# -- options --


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        (["ro", "nosuid", "nodev", "noexec"], "MS_RDONLY MS_NOSUID MS_NODEV MS_NOEXEC"),
        (["rbind"], "MS_BIND MS_REC"),
        (["bind", "ro", "rw"], "MS_BIND"),
        (["sync", "async", "dirsync"], "MS_DIRSYNC"),
        (["noatime", "atime", "nodiratime", "relatime"], "MS_NODIRATIME MS_RELATIME"),
        (["strictatime", "mand", "nomand", "remount"], "MS_STRICTATIME MS_REMOUNT"),
        (["suid", "dev", "exec", "diratime", "norelatime", "nostrictatime"], ""),
        (["rprivate"], "MS_PRIVATE MS_REC"),
        (["slave"], "MS_SLAVE"),
        (["defaults"], ""),
    ],
)
def test_flag_words_become_flags(options: list[str], flags: str) -> None:
    """Words of the flag table set or clear flags, in order, and never reach the data."""
    expected = 0
    for name in flags.split():
        expected |= getattr(plat, name)
    parsed = parse_options(options)
    assert (parsed.flags, parsed.data, parsed.loop) == (expected, "", False)


def test_other_options_are_filesystem_data() -> None:
    """Everything else goes to the filesystem, comma-joined, in order."""
    parsed = parse_options(["index=off", "ro", "lowerdir=/a:/b", "direct-io", "upperdir=/u"])
    assert parsed.flags == plat.MS_RDONLY
    assert parsed.data == "index=off,lowerdir=/a:/b,direct-io,upperdir=/u"


def test_loop_and_direct_io_are_ours() -> None:
    """`loop` asks for a loop device, and then `direct-io` is its option, not data."""
    parsed = parse_options(["loop", "ro", "direct-io", "errors=remount-ro"])
    assert (parsed.loop, parsed.direct_io, parsed.data) == (True, True, "errors=remount-ro")


# -- bind --


def test_bind_mount_rw_and_ro(rootfs: Path, tmp_path: Path) -> None:
    """A rw bind shows and takes writes; a ro bind shows the files and refuses writes."""
    src = tree(tmp_path / "src", {"hello": "world"})
    mount_all([Mount("bind", str(src), options=("rbind", "rw"))], rootfs)
    assert (rootfs / "hello").read_text() == "world"
    (rootfs / "new").write_text("x")
    assert (src / "new").read_text() == "x"
    unmount_all(rootfs)
    assert points_below(rootfs) == []

    mount_all([Mount("bind", str(src), options=("bind", "ro"))], rootfs)
    assert (rootfs / "hello").read_text() == "world"
    with pytest.raises(OSError) as info:
        (rootfs / "other").write_text("x")
    assert info.value.errno == errno.EROFS


# -- overlay --


def test_overlay_merges_layers_and_whiteouts_deletions(rootfs: Path, tmp_path: Path) -> None:
    """Two lowers + upper: the leftmost lower wins, deletions become whiteouts in upper."""
    lower1 = tree(tmp_path / "l1", {"a": "a1", "b": "b1"})
    lower2 = tree(tmp_path / "l2", {"b": "b2", "c": "c2"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    options = (f"lowerdir={lower2}:{lower1}", f"upperdir={upper}", f"workdir={work}", "index=off")
    mount_all([Mount("overlay", "overlay", options=options)], rootfs)

    assert {p.name: p.read_text() for p in rootfs.iterdir()} == {"a": "a1", "b": "b2", "c": "c2"}
    (rootfs / "a").unlink()
    (rootfs / "d").write_text("new")
    assert sorted(p.name for p in rootfs.iterdir()) == ["b", "c", "d"]
    assert (lower1 / "a").read_text() == "a1", "a lower layer must never change"
    whiteout = os.lstat(upper / "a")
    assert (os.major(whiteout.st_rdev), os.minor(whiteout.st_rdev)) == (0, 0)
    assert (upper / "d").read_text() == "new"


def test_overlay_with_128_long_lowerdirs(rootfs: Path, tmp_path: Path) -> None:
    """Lowerdir options far past one page still mount, without moving the shim's cwd."""
    snapshots = tmp_path / ("a-long-snapshotter-root-" * 6) / "snapshots"
    lowers = [tree(snapshots / str(i) / "fs", {f"f{i}": str(i), "top": str(i)}) for i in range(128)]
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    lowerdir = "lowerdir=" + ":".join(str(p) for p in reversed(lowers))  # 127 on top
    options = ("index=off", f"workdir={work}", f"upperdir={upper}", lowerdir)
    assert len(",".join(options)) > 4096
    cwd = os.getcwd()

    mount_all([Mount("overlay", "overlay", options=options)], rootfs)

    assert os.getcwd() == cwd
    assert all((rootfs / f"f{i}").read_text() == str(i) for i in range(128))
    assert (rootfs / "top").read_text() == "127"


def test_long_overlay_mounts_in_parallel_threads(tmp_path: Path) -> None:
    """Mounts relative to a private cwd do not disturb each other or other threads."""
    require_root()
    snapshots = tmp_path / ("x" * 120) / "snapshots"
    targets = []
    jobs = []
    for n in range(4):
        lowers = [tree(snapshots / f"{n}-{i}" / "fs", {"who": f"{n}"}) for i in range(64)]
        target = tmp_path / f"rootfs{n}"
        target.mkdir()
        targets.append(target)
        options = ("lowerdir=" + ":".join(map(str, lowers)),)
        jobs.append(([Mount("overlay", "overlay", options=options)], target))
    errors: list[BaseException] = []

    def work(mounts: list[Mount], target: Path) -> None:
        try:
            mount_all(mounts, target)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert [(t / "who").read_text() for t in targets] == ["0", "1", "2", "3"]
    finally:
        unmount_all(tmp_path)


# -- images --


def test_erofs_image_file_direct_and_with_loop(rootfs: Path, tmp_path: Path) -> None:
    """An erofs image file mounts as a file (no loop), and through a loop device with `loop`."""
    mkfs = require_binary("mkfs.erofs")
    content = tree(tmp_path / "content", {"etc/os-release": "polyshim"})
    image = tmp_path / "layer.erofs"
    subprocess.run([mkfs, str(image), str(content)], check=True, capture_output=True)

    mount_all([Mount("erofs", str(image), options=("ro",))], rootfs)
    assert (rootfs / "etc/os-release").read_text() == "polyshim"
    unmount_all(rootfs)
    assert_loop_freed(image)

    mount_all([Mount("erofs", str(image), options=("ro", "loop"))], rootfs)
    assert (rootfs / "etc/os-release").read_text() == "polyshim"
    assert len(loop_devices_of(image)) == 1
    unmount_all(rootfs)
    assert points_below(rootfs) == []
    assert_loop_freed(image)


def test_ext4_image_with_loop_rw_then_ro(rootfs: Path, tmp_path: Path) -> None:
    """A sparse ext4 image on a loop device takes writes; mounted ro again it keeps them."""
    mkfs = require_binary("mkfs.ext4")
    image = tmp_path / "snapshot.ext4"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run([mkfs, "-F", "-q", str(image)], check=True, capture_output=True)

    mount_all([Mount("ext4", str(image), options=("loop", "rw"))], rootfs)
    (rootfs / "kept").write_text("yes")
    unmount_all(rootfs)
    assert_loop_freed(image)

    mount_all([Mount("ext4", str(image), options=("loop", "ro"))], rootfs)
    assert (rootfs / "kept").read_text() == "yes"
    with pytest.raises(OSError) as info:
        (rootfs / "more").write_text("no")
    assert info.value.errno == errno.EROFS
    unmount_all(rootfs)
    assert_loop_freed(image)


# -- targets, failures, cleanup --


def test_mount_with_target_subpath(rootfs: Path, tmp_path: Path) -> None:
    """A mount with `target` lands at rootfs/<target>, on top of the earlier mounts."""
    base = tree(tmp_path / "base", {"mnt/data/.keep": ""})
    data = tree(tmp_path / "data", {"file": "data"})
    mount_all(
        [
            Mount("bind", str(base), options=("rbind", "rw")),
            Mount("bind", str(data), target="/mnt/data", options=("rbind", "ro")),
        ],
        rootfs,
    )
    assert (rootfs / "mnt/data/file").read_text() == "data"
    assert set(points_below(rootfs)) == {str(rootfs), str(rootfs / "mnt/data")}


def test_target_symlink_cannot_leave_the_rootfs(rootfs: Path, tmp_path: Path) -> None:
    """A symlink in the image resolves inside the rootfs, never to the host's path."""
    base = tree(tmp_path / "base", {"inside/.keep": ""})
    (base / "link").symlink_to("../../../../../inside")
    (tmp_path / "inside").mkdir()  # what the link names on the host, outside the rootfs
    data = tree(tmp_path / "data", {"file": "data"})
    mount_all(
        [
            Mount("bind", str(base), options=("rbind", "rw")),
            Mount("bind", str(data), target="link", options=("rbind",)),
        ],
        rootfs,
    )
    assert (rootfs / "inside/file").read_text() == "data"
    assert points_below(tmp_path / "inside") == []


def test_failure_in_second_mount_leaves_nothing_mounted(rootfs: Path, tmp_path: Path) -> None:
    """When mount 2 fails, mount 1 is undone and the error names mount 2 and why."""
    src = tree(tmp_path / "src", {"f": ""})
    bad = Mount("overlay", "overlay", options=(f"lowerdir={tmp_path}/missing:{tmp_path}/gone",))
    with pytest.raises(InvalidArgument, match="rootfs mount 2 of 2 \\(overlay"):
        mount_all([Mount("bind", str(src), options=("rbind",)), bad], rootfs)
    assert points_below(rootfs) == []


def test_failed_loop_mount_frees_its_loop_device(rootfs: Path, tmp_path: Path) -> None:
    """A loop mount the filesystem refuses leaves no loop device behind."""
    image = tmp_path / "not-a-filesystem.img"
    image.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(InvalidArgument, match="rootfs mount 1 of 1"):
        mount_all([Mount("ext4", str(image), options=("loop", "ro"))], rootfs)
    assert points_below(rootfs) == []
    assert_loop_freed(image)


def test_unmount_all_handles_nested_and_stacked_mounts(rootfs: Path, tmp_path: Path) -> None:
    """Nested and stacked mounts all go; a second call and a missing path are fine."""
    a = tree(tmp_path / "a", {"sub/.keep": ""})
    b = tree(tmp_path / "b", {"deeper/.keep": ""})
    c = tree(tmp_path / "c", {})
    plat.mount(str(a), str(rootfs), "", plat.MS_BIND, "")
    plat.mount(str(b), str(rootfs / "sub"), "", plat.MS_BIND, "")
    plat.mount(str(c), str(rootfs / "sub/deeper"), "", plat.MS_BIND, "")
    plat.mount(str(c), str(rootfs / "sub/deeper"), "", plat.MS_BIND, "")  # stacked
    plat.mount(str(a), str(rootfs), "", plat.MS_BIND, "")  # stacked on the root
    assert len(points_below(rootfs)) == 5

    unmount_all(rootfs)
    assert points_below(rootfs) == []
    unmount_all(rootfs)
    unmount_all(tmp_path / "does-not-exist")


def test_containing_names_the_top_mount_at_the_longest_point(rootfs: Path, tmp_path: Path) -> None:
    """With escapes in the path: mountinfo writes a space as \\040."""
    outside = containing(tmp_path)
    assert outside is not None and outside.fstype != "tmpfs"
    spaced = rootfs / "a dir"
    spaced.mkdir()
    try:
        plat.mount("tmpfs", str(spaced), "tmpfs", 0, "size=1m")
        found = containing(spaced / "file")
        assert found is not None and (found.point, found.fstype) == (str(spaced), "tmpfs")
        source = tree(tmp_path / "src", {"x": ""})
        plat.mount(str(source), str(spaced), "", plat.MS_BIND, "")  # stacked on the tmpfs
        top = containing(spaced)
        assert top is not None and top.fstype == outside.fstype and top.root.endswith("/src")
    finally:
        unmount_all(rootfs)
    assert containing(spaced) == containing(tmp_path)


def test_busy_mount_is_detached_lazily(rootfs: Path, tmp_path: Path) -> None:
    """A mount with an open file is detached at once rather than failing."""
    src = tree(tmp_path / "src", {"held": "open"})
    mount_all([Mount("bind", str(src), options=("bind",))], rootfs)
    fd = os.open(rootfs / "held", os.O_RDONLY)
    try:
        unmount_all(rootfs)
        assert points_below(rootfs) == []
        assert os.read(fd, 10) == b"open"  # the detached mount lives on for its user
    finally:
        os.close(fd)
