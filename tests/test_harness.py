"""The test harness works for real: private containerd daemons, built images, bundles."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shim_framework.mounts import points_below
from tests.harness import (
    CtrError,
    File,
    HardLink,
    Layer,
    OpaqueWhiteout,
    PrivateContainerd,
    Symlink,
    Whiteout,
    build_oci_archive,
    busybox_config,
    busybox_rootfs,
    get_install,
    import_image,
    installs,
    make_bundle,
    require,
    require_binary,
    require_root,
)


def task_status(ctrd: PrivateContainerd) -> dict[str, str]:
    """{task id: STATUS} from ``ctr task ls``."""
    lines = ctrd.ctr("task", "ls").stdout.splitlines()[1:]
    return {fields[0]: fields[2] for fields in (line.split() for line in lines) if fields}


def task_pid(ctrd: PrivateContainerd, task: str) -> int:
    """Host pid of a task's init process, from ``ctr task ls``."""
    for line in ctrd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == task:
            return int(fields[1])
    raise AssertionError(f"no task {task!r}")


# ---------------------------------------------------------------------- requirements


def test_require_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        require(False, "no widget")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI requirement missing: no widget"):
        require(False, "no widget")
    require(True, "never raised")


def test_require_binary_returns_path() -> None:
    assert require_binary("sh").name == "sh"


def test_both_containerd_installs_present() -> None:
    labels = [i.label for i in installs()]
    require(labels == ["1.6", "2.1"], f"containerd installs present: {labels} (run scripts/setup)")
    assert get_install("1.6").version().startswith("1.6.")
    assert get_install("2.1").version().startswith("2.1.")


# ---------------------------------------------------------------------- images (no daemon)


def _read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_oci_archive_is_deterministic_and_consistent(tmp_path: Path) -> None:
    layers = [
        Layer.from_entries({"etc/motd": "hi\n", "bin/x": File(b"#!/bin/sh\n", mode=0o755)}),
        Layer.from_entries({"etc/motd": Whiteout(), "etc/m2": HardLink("bin/x")}),
    ]
    config = {"config": {"Cmd": ["sh"]}}
    a = build_oci_archive(tmp_path / "a.tar", "example.com/x:v1", layers, config)
    b = build_oci_archive(tmp_path / "b.tar", "example.com/x:v1", layers, config)
    assert a.read_bytes() == b.read_bytes()

    files = _read_archive(a)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]

    def blob(desc: dict) -> bytes:
        data = files["blobs/sha256/" + desc["digest"].split(":", 1)[1]]
        assert len(data) == desc["size"]
        return data

    index = json.loads(files["index.json"])
    (mdesc,) = index["manifests"]
    assert mdesc["annotations"] == {
        "io.containerd.image.name": "example.com/x:v1",
        "org.opencontainers.image.ref.name": "v1",
    }
    manifest = json.loads(blob(mdesc))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    image_config = json.loads(blob(manifest["config"]))
    assert image_config["os"] == "linux"
    assert image_config["config"] == {"Cmd": ["sh"]}
    diff_ids = image_config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"]) == 2
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        raw = gzip.decompress(blob(desc))
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(manifest["layers"][1])))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"etc", "etc/.wh.motd", "etc/m2"}
    assert members["etc/m2"].islnk() and members["etc/m2"].linkname == "bin/x"


def test_layer_from_dir_keeps_links_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_text("x")
    (root / "a" / "f").chmod(0o600)
    os.link(root / "a" / "f", root / "z-hard")
    (root / "s").symlink_to("a/f")
    layer = Layer.from_dir(root)
    entries = dict(layer.entries)
    assert entries["a/f"] == File(b"x", 0o600)
    assert entries["z-hard"] == HardLink("a/f")
    assert entries["s"] == Symlink("a/f")
    assert [p for p, _ in layer.entries] == ["a", "a/f", "s", "z-hard"]
    assert Layer.from_dir(root).tar_bytes() == layer.tar_bytes()


def test_busybox_rootfs_has_applets(tmp_path: Path) -> None:
    require(Path("/bin/busybox").exists(), "/bin/busybox missing (busybox-static: scripts/setup)")
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    assert (rootfs / "bin" / "busybox").is_file()
    assert os.readlink(rootfs / "bin" / "sh") == "/bin/busybox"
    assert (rootfs / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    for d in ("tmp", "proc", "sys", "dev"):
        assert (rootfs / d).is_dir()


# ---------------------------------------------------------------------- real containerd


@pytest.mark.integration
def test_ctr_run_prints_hello(containerd: PrivateContainerd, busybox: str) -> None:
    res = containerd.ctr("run", "--rm", busybox, "t1", "echo", "hello")
    assert res.stdout == "hello\n"
    assert task_status(containerd) == {}


@pytest.mark.integration
def test_ctr_run_returns_task_exit_code(containerd: PrivateContainerd, busybox: str) -> None:
    res = containerd.ctr("run", "--rm", busybox, "t1", "sh", "-c", "exit 3", check=False)
    assert res.returncode == 3, res
    with pytest.raises(CtrError) as info:
        containerd.ctr("run", "--rm", busybox, "t2", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert info.value.returncode == 3
    assert "exit 3" in str(info.value) and "out" in str(info.value)


@pytest.mark.integration
def test_multi_layer_image_with_whiteouts_and_hard_links(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    base = Layer.from_dir(busybox_rootfs(tmp_path / "rootfs"))
    top = Layer.from_entries(
        {
            "etc/group": Whiteout(),
            "data/a": "layer two\n",
            "data/b": HardLink("data/a"),
            "usr/sbin": OpaqueWhiteout(),
        }
    )
    archive = build_oci_archive(
        tmp_path / "img.tar", "example.com/layers:1", [base, top], busybox_config()
    )
    name = import_image(containerd, archive)
    script = (
        "test ! -e /etc/group && test -e /etc/passwd && cat /data/b && "
        "stat -c %h /data/a && ls -A /usr/sbin | wc -l"
    )
    res = containerd.ctr("run", "--rm", name, "t1", "sh", "-c", script)
    assert res.stdout.split() == ["layer", "two", "2", "0"]


@pytest.mark.integration
def test_restart_keeps_running_tasks(containerd: PrivateContainerd, busybox: str) -> None:
    containerd.ctr("run", "-d", busybox, "sleeper", "sleep", "300")
    assert task_status(containerd) == {"sleeper": "RUNNING"}
    shims = containerd.shim_pids()
    assert len(shims) == 1
    # Each daemon runs its own version's runc shim (found first on its PATH).
    assert Path(f"/proc/{shims[0]}/exe").resolve() == containerd.install.shim_runc_v2.resolve()
    containerd.restart()
    assert containerd.shim_pids() == shims
    assert task_status(containerd) == {"sleeper": "RUNNING"}
    # Left running on purpose: the fixture's cleanup must kill and delete it.


@pytest.mark.integration
def test_two_private_daemons_do_not_interfere(
    containerd_factory: Callable[..., PrivateContainerd], busybox_archive: Path
) -> None:
    a, b = containerd_factory(), containerd_factory()
    assert len({a.address, b.address, a.ttrpc_address, b.ttrpc_address}) == 4
    assert a.namespace != b.namespace
    import_image(a, busybox_archive)
    assert b.ctr("images", "ls", "-q").stdout.split() == []
    name = import_image(b, busybox_archive)
    # The same container id in both daemons at once.
    for ctrd in (a, b):
        ctrd.ctr("run", "-d", name, "same", "sleep", "300")
    assert task_status(a) == task_status(b) == {"same": "RUNNING"}
    a.ctr("task", "kill", "-s", "SIGKILL", "same")
    a.ctr("task", "wait", "same", check=False, timeout=30)
    a.ctr("task", "delete", "same")
    a.ctr("container", "delete", "same")
    assert task_status(a) == {}
    assert task_status(b) == {"same": "RUNNING"}
    assert b.ctr("run", "--rm", name, "t1", "echo", "still here").stdout == "still here\n"


@pytest.mark.integration
@pytest.mark.parametrize("daemon", ["running", "stopped"])
@pytest.mark.parametrize("label", ["1.6", "2.1"])
def test_cleanup_removes_everything(label: str, daemon: str, busybox_archive: Path) -> None:
    require_root()
    ctrd = PrivateContainerd(get_install(label))
    with ctrd:
        import_image(ctrd, busybox_archive)
        ctrd.ctr("run", "-d", "docker.io/library/busybox:latest", "left", "sleep", "300")
        pid = task_pid(ctrd, "left")
        assert ctrd.shim_pids()
        assert points_below(ctrd.dir)
        if daemon == "stopped":
            ctrd.stop()
            assert ctrd.shim_pids()
    assert not ctrd.dir.exists()
    assert ctrd.shim_pids() == []
    assert not Path(f"/proc/{pid}").exists()
    assert not points_below(ctrd.dir)
    assert not (Path("/run/containerd/runc") / ctrd.namespace).exists()


# ---------------------------------------------------------------------- bundles


@pytest.mark.integration
def test_make_bundle_runs_under_runc(tmp_path: Path) -> None:
    require_root()
    runc = require_binary("runc")
    bundle = make_bundle(
        tmp_path / "bundle",
        ["sh", "-c", "echo from-bundle $(hostname) $FOO"],
        env=["PATH=/bin:/usr/bin", "FOO=bar"],
        annotations={"io.polyshim.test": "yes"},
    )
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert spec["annotations"] == {"io.polyshim.test": "yes"}
    container_id = f"psh-{secrets.token_hex(4)}"
    res = subprocess.run(
        [runc, "--root", str(tmp_path / "runc"), "run", "--bundle", str(bundle), container_id],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "from-bundle polyshim bar\n"
