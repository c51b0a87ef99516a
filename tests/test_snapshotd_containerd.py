"""polyshim-snapshotd under real containerd 1.6.20 and 2.1.9, through `[proxy_plugins]`.

containerd imports a multi-layer image into each of the daemon's drivers
in turn (overlay and erofs: its walking differ writes each layer straight
into the upperdir we return, turning whiteouts into overlay whiteouts;
blockfile: it loop-mounts the image and deletes what whiteouts name),
polyshim's shim mounts the container's rootfs from the mounts we return,
and containerd's garbage collector later removes every backend snapshot
and calls Cleanup once the image is gone.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import proxy_plugins_toml, unpack_config_toml
from daemon.main import PAUSES_ENV
from tests.harness import (
    Dir,
    File,
    HardLink,
    Layer,
    OpaqueWhiteout,
    PrivateContainerd,
    Whiteout,
    build_oci_archive,
    busybox_config,
    busybox_rootfs,
    host_platform,
    image_name,
)
from tests.harness.requirements import require, require_root
from tests.harness.snapshotd import SnapshotClient, SnapshotdProcess, remove_tree, short_tempdir

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.polyshim.v2"
DRIVERS = ["overlay", "erofs", "blockfile"]
IMAGE = "docker.io/polyshim/layers:test"

# What the container must see of the four layers below, one line each.
SCRIPT = """
cat /data/kept /data/changed /data/opq/new /data/l3 /data/links/a /data/lower-links/a
for p in /data/gone /data/dir-gone /data/opq/old /data/lower-links/b; do
  [ -e "$p" ] && echo "still there: $p"
done
echo "opq: $(ls -A /data/opq)"
echo "links: $(stat -c '%i %h' /data/links/a) $(stat -c '%i %h' /data/links/b)"
"""


@pytest.fixture(scope="session")
def layered_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox plus three layers with whiteouts, an opaque directory and hard links."""
    require(Path("/bin/busybox").exists(), "/bin/busybox missing (apt-get install busybox-static)")
    work = tmp_path_factory.mktemp("layered")
    base = Layer.from_dir(busybox_rootfs(work / "rootfs"))
    data = Layer.from_entries(
        {
            "data/kept": "kept\n",
            "data/gone": "gone\n",
            "data/changed": "v1\n",
            "data/dir-gone/x": "x\n",
            "data/opq/old": "old\n",
            "data/lower-links/a": "lower link\n",
            "data/lower-links/b": HardLink("data/lower-links/a"),
        }
    )
    changes = Layer.from_entries(
        {
            "data/gone": Whiteout(),
            "data/dir-gone": Whiteout(),
            "data/opq": OpaqueWhiteout(),
            "data/opq/new": "new\n",
            "data/changed": File(b"v2\n", mode=0o600),
            "data/links": Dir(0o755),
            "data/links/a": "linked\n",
            "data/links/b": HardLink("data/links/a"),
        }
    )
    third = Layer.from_entries({"data/l3": "third\n", "data/lower-links/b": Whiteout()})
    return build_oci_archive(
        work / "layers.oci.tar", IMAGE, [base, data, changes, third], busybox_config()
    )


@pytest.fixture(params=DRIVERS)
def snapshotter(request: pytest.FixtureRequest) -> str:
    """Each driver in turn, as the snapshotter name it is served under (`polyshim-DRIVER`)."""
    return f"polyshim-{request.param}"


@pytest.fixture
def snapshotd(snapshotter: str) -> Iterator[SnapshotdProcess]:
    """polyshim-snapshotd serving the driver as `polyshim-DRIVER`."""
    require_root()
    driver = snapshotter.removeprefix("polyshim-")
    proc = SnapshotdProcess(short_tempdir(), f"{snapshotter}={driver}")
    try:
        yield proc.start()
    finally:
        proc.stop()
        if proc.proc is not None and proc.proc.returncode not in (0, None):
            print(proc.log_tail())
        remove_tree(proc.base)


@pytest.fixture
def ctrd(
    snapshotter: str,
    snapshotd: SnapshotdProcess,
    containerd_factory: Callable[..., PrivateContainerd],
) -> PrivateContainerd:
    """A private containerd (1.6 and 2.1 in turn) with the daemon as a proxy snapshotter."""
    config = proxy_plugins_toml(
        [snapshotter], snapshotd.socket, config_version=2, root=snapshotd.root
    )
    config += unpack_config_toml([snapshotter], host_platform())  # 2.x; 1.6 ignores it
    return containerd_factory(extra_config=config)


def import_layered(ctrd: PrivateContainerd, snapshotter: str, archive: Path) -> str:
    ctrd.ctr(
        "images", "import", "--platform", host_platform(), "--snapshotter", snapshotter,
        str(archive), timeout=120,
    )  # fmt: skip
    return image_name(archive)


def run(ctrd: PrivateContainerd, snapshotter: str, image: str, cid: str, script: str) -> str:
    result = ctrd.ctr(
        "run", "--rm", "--snapshotter", snapshotter, "--runtime", RUNTIME,
        image, cid, "sh", "-c", script, timeout=120,
    )  # fmt: skip
    return result.stdout


def wait_for_reconnection(ctrd: PrivateContainerd, snapshotter: str) -> None:
    """containerd's gRPC client reconnects to a restarted daemon with backoff (max 3 s) and
    fails calls meanwhile: wait until a Prepare of a probe snapshot gets through."""
    snapshots = ("snapshots", "--snapshotter", snapshotter)
    deadline = time.monotonic() + 30
    while ctrd.ctr(*snapshots, "prepare", "reconnected", check=False).returncode:
        assert time.monotonic() < deadline, "containerd never reconnected to the daemon"
        time.sleep(0.2)
    ctrd.ctr(*snapshots, "rm", "reconnected")


def backend_storage(snapshotd: SnapshotdProcess, snapshotter: str) -> list[str]:
    """What the daemon keeps on disk for the snapshotter (snapshots and trash)."""
    root = snapshotd.root / snapshotter
    return sorted(
        f"{d}/{entry.name}" for d in ("snapshots", "trash") for entry in (root / d).iterdir()
    )


def leftovers(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, backend: SnapshotClient
) -> list[str]:
    """Everything of an image that containerd and the daemon still hold: containerd's
    snapshots and content, the backend's snapshots, storage on disk."""
    left = []
    listed = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout
    left += [f"containerd snapshot {line}" for line in listed.splitlines()[1:]]
    left += [f"content {c}" for c in ctrd.ctr("content", "ls", "-q").stdout.split()]
    left += [f"backend snapshot {i.name}" for i in backend.list()]
    left += [f"on disk {p}" for p in backend_storage(snapshotd, snapshotter)]
    return left


def remove_image(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, image: str
) -> None:
    """`ctr images rm` *image*, then wait up to 60 s for containerd's GC to leave no
    `leftovers` (it runs asynchronously; --sync waits for one pass only)."""
    ctrd.ctr("images", "rm", "--sync", image)
    backend = snapshotd.client(snapshotter)
    try:
        deadline = time.monotonic() + 60
        while left := leftovers(ctrd, snapshotd, snapshotter, backend):
            assert time.monotonic() < deadline, f"still there 60 s after `ctr images rm`: {left}"
            time.sleep(0.2)
    finally:
        backend.close()


def test_container_sees_the_merged_layers(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, layered_archive: Path
):
    """Whiteouts hide, the opaque dir shows only its new file, hard links share an inode."""
    image = import_layered(ctrd, snapshotter, layered_archive)
    # containerd 1.6 stores 4 committed layers in the backend, under its own keys.
    backend = snapshotd.client(snapshotter)
    layers = backend.list("kind==committed")
    assert len(layers) == 4
    # Keys as containerd's metadata layer makes them: <namespace>/<sequence>/<chain id>.
    assert all(i.name.startswith(f"{ctrd.namespace}/") and "/sha256:" in i.name for i in layers)

    lines = run(ctrd, snapshotter, image, "merged", SCRIPT).splitlines()
    assert lines[:6] == ["kept", "v2", "new", "third", "linked", "lower link"], lines
    assert not [line for line in lines if line.startswith("still there")], lines
    assert "opq: new" in lines
    links = next(line for line in lines if line.startswith("links: ")).split()[1:]
    assert links[0] == links[2] and links[1] == links[3] == "2", lines  # one inode, two names
    backend.close()


def test_image_removal_frees_backend_storage(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, layered_archive: Path
):
    """After `ctr images rm`, containerd's GC removes every backend snapshot and disk is empty."""
    image = import_layered(ctrd, snapshotter, layered_archive)
    assert run(ctrd, snapshotter, image, "gc", "cat /data/kept") == "kept\n"
    backend = snapshotd.client(snapshotter)
    assert backend.list()
    backend.close()
    remove_image(ctrd, snapshotd, snapshotter, image)


def test_images_survive_a_daemon_restart(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, layered_archive: Path
):
    """Restart the daemon under a running containerd: the image still runs (state on disk)."""
    image = import_layered(ctrd, snapshotter, layered_archive)
    assert snapshotd.stop() == 0
    snapshotd.start()
    wait_for_reconnection(ctrd, snapshotter)
    assert run(ctrd, snapshotter, image, "restarted", "cat /data/l3") == "third\n"


def test_a_daemon_killed_in_a_commit_leaves_containerd_working(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, layered_archive: Path
):
    """SIGKILL inside the metadata transaction of a Commit that containerd's unpack asked
    for: after a restart the same containerd imports the image and runs it, and its GC leaves
    no backend snapshot and nothing on disk once the image is gone."""
    snapshotd.stop()
    snapshotd.start(env={PAUSES_ENV: "commit.txn=30"})  # every Commit stops there
    wait_for_reconnection(ctrd, snapshotter)
    importing = subprocess.Popen(
        ctrd.ctr_command("images", "import", "--platform", host_platform(), "--snapshotter",
                         snapshotter, str(layered_archive)),
        env=ctrd.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "test pause commit.txn" not in snapshotd.log_path.read_text(errors="replace"):
            assert importing.poll() is None, f"import ended first: {importing.stderr.read()}"
            assert time.monotonic() < deadline, "containerd's unpack never reached a Commit"
            time.sleep(0.05)
        snapshotd.kill()
    finally:
        importing.wait(timeout=120)
    assert importing.returncode != 0  # its Commit died with the daemon
    snapshotd.start(env={PAUSES_ENV: ""})
    wait_for_reconnection(ctrd, snapshotter)
    image = import_layered(ctrd, snapshotter, layered_archive)
    assert run(ctrd, snapshotter, image, "after-kill", "cat /data/l3") == "third\n"

    remove_image(ctrd, snapshotd, snapshotter, image)


def test_config_is_accepted_by_containerd(ctrd: PrivateContainerd, snapshotter: str):
    """containerd loads the emitted [proxy_plugins] table as a snapshotter plugin."""
    plugins = ctrd.ctr("plugins", "ls").stdout
    line = next(line for line in plugins.splitlines() if f" {snapshotter} " in line)
    assert "io.containerd.snapshotter.v1" in line and line.split()[-1] == "ok", line


@pytest.fixture(scope="session")
def deep_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox plus 127 one-file layers (128 in all), run as user `nobody`."""
    require(Path("/bin/busybox").exists(), "/bin/busybox missing (apt-get install busybox-static)")
    work = tmp_path_factory.mktemp("deep")
    layers = [Layer.from_dir(busybox_rootfs(work / "rootfs"))]
    layers += [Layer.from_entries({f"layers/{i:03d}": f"{i}\n"}) for i in range(1, 128)]
    config = busybox_config()
    config["config"]["User"] = "nobody"
    return build_oci_archive(work / "deep.oci.tar", "docker.io/polyshim/deep:test", layers, config)


def test_128_layer_image_runs(
    ctrd: PrivateContainerd, snapshotd: SnapshotdProcess, snapshotter: str, deep_archive: Path
):
    """128 lowers: containerd's own mount code (resolving the image's user through a temporary
    mount of the rootfs, lowerdir beyond a page) and the shim's both mount what we return."""
    image = import_layered(ctrd, snapshotter, deep_archive)
    script = "id -u; ls /layers | wc -l; cat /layers/127"
    out = run(ctrd, snapshotter, image, "deep", script).split()
    assert out == ["65534", "127", "127"]
