"""How the shim binary reads containerd's command line and names its socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim_framework import _platform as plat
from shim_framework import bootstrap
from shim_framework.bootstrap import Flags, UsageError, parse_flags
from shim_framework.mounts import points_below, unmount_all
from tests.harness.requirements import require_root


def test_start_command_line_as_containerd_sends_it() -> None:
    argv = ["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary",
            "/usr/bin/containerd", "-id", "c1", "-debug", "start"]  # fmt: skip
    assert parse_flags(argv) == Flags(
        namespace="k8s.io", address="/run/c.sock", publish_binary="/usr/bin/containerd",
        id="c1", debug=True, action="start",
    )  # fmt: skip


def test_delete_with_bundle_and_go_flag_forms() -> None:
    flags = parse_flags(["--namespace=default", "-id", "c2", "-bundle", "/b", "delete", "x"])
    assert (flags.namespace, flags.id, flags.bundle, flags.action) == (
        "default",
        "c2",
        "/b",
        "delete",
    )


def test_version_and_info_flags() -> None:
    assert parse_flags(["-v"]).version and parse_flags(["-info"]).info


@pytest.mark.parametrize("argv", [["-id"], ["-frobnicate", "start"]])
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_flags(argv)


def test_group_comes_from_pod_annotations(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": "pod-1"}})
    )
    assert bootstrap.group_id(str(tmp_path), "c1") == "pod-1"
    (tmp_path / "config.json").write_text('{"io.kubernetes.cri.sandbox-id": broken')
    assert bootstrap.group_id(str(tmp_path), "c1") == "c1"
    (tmp_path / "config.json").write_text('{"annotations": {}}')
    assert bootstrap.group_id(str(tmp_path), "c1") == "c1"
    # Spacing, precedence, escapes and repeats as JSON allows them.
    cases = {
        '{"annotations": {"io.kubernetes.cri.sandbox-id" :  "pod-2"}}': "pod-2",
        '{"annotations": {"io.kubernetes.cri.sandbox-id": "p", "io.polyshim.group": "g"}}': "g",
        r'{"annotations": {"io.kubernetes.cri.sandbox-id": "a\"b"}}': 'a"b',
        '{"process": {"args": ["io.kubernetes.cri.sandbox-id"]}, '
        '"annotations": {"io.kubernetes.cri.sandbox-id": "pod-3"}}': "pod-3",
    }
    for text, group in cases.items():
        (tmp_path / "config.json").write_text(text)
        assert bootstrap.group_id(str(tmp_path), "c1") == group, text


@pytest.mark.parametrize(
    ("pid", "status", "ns"), [(0, 0, 0), (4242, 137, 1_700_000_000_123_456_789), (1, 3, -1)]
)
def test_delete_response_bytes_match_the_generated_message(pid: int, status: int, ns: int):
    """The hand-encoded DeleteResponse of the `delete` action decodes like containerd's."""
    from shim_framework.api.task.v2 import shim_pb2

    expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    expected.exited_at.FromNanoseconds(ns)
    got = bootstrap.delete_response(pid, status, ns)
    assert got == expected.SerializeToString()
    assert shim_pb2.DeleteResponse.FromString(got) == expected


def test_socket_path_separates_daemons_namespaces_and_groups() -> None:
    paths = {
        bootstrap.socket_path(address, ns, group)
        for address in ("/run/a.sock", "/run/b.sock")
        for ns in ("default", "k8s.io")
        for group in ("g1", "g2")
    }
    assert len(paths) == 8
    assert all(p.startswith("/run/containerd/s/") and len(p) <= 106 for p in paths)


def test_bootstrap_params_are_told_from_an_options_any() -> None:
    """2.3's BootstrapParams (instance_id first) vs 1.6-2.2's options Any (type URL first)."""
    from google.protobuf import any_pb2

    from shim_framework.api.runtime.bootstrap.v1 import bootstrap_pb2

    flags = parse_flags(["-namespace", "ns", "-id", "c1", "start"])
    params = bootstrap_pb2.BootstrapParams(instance_id="c1", namespace="ns", socket_dir="/s")
    assert bootstrap._bootstrap_socket_dir(params.SerializeToString(), flags) == "/s"
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x12\x03/x")
    assert bootstrap._bootstrap_socket_dir(options.SerializeToString(), flags) is None
    assert bootstrap._bootstrap_socket_dir(b"", flags) is None
    long_id = parse_flags(["-namespace", "ns", "-id", "c" * 200, "start"])
    params = bootstrap_pb2.BootstrapParams(instance_id="c" * 200, namespace="ns", socket_dir="/t")
    assert bootstrap._bootstrap_socket_dir(params.SerializeToString(), long_id) == "/t"


def test_delete_unmounts_a_rootfs_whose_path_mountinfo_escapes(tmp_path: Path) -> None:
    """A space in the bundle path is \\040 in mountinfo; delete must still see the mount."""
    require_root()
    bundle = tmp_path / "a bundle"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    plat.mount("tmpfs", str(rootfs), "tmpfs", 0, "size=1m")
    try:
        bootstrap.delete(
            parse_flags(["-namespace", "ns", "-id", "c1", f"-bundle={bundle}", "delete"])
        )
        assert points_below(rootfs) == []
    finally:
        unmount_all(rootfs)
