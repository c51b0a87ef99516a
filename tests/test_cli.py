"""The command-line faces of polyshim: `polyshim`, and the shim's -v and -info."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shim_framework.api.types import introspection_pb2
from tests.harness import get_install, require_root

BIN = Path(sys.prefix) / "bin"


def run(*argv: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=input, capture_output=True, timeout=60)


def test_backends_lists_runc_with_capabilities_and_availability() -> None:
    out = run(str(BIN / "polyshim"), "backends").stdout.decode()
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["BACKEND", "FROM"]
    runc = next(r for r in rows if r.startswith("runc "))
    assert "exec" in runc and "terminal" in runc and runc.rstrip().endswith("yes")


@pytest.mark.parametrize(("label", "version"), [("1.6", 2), ("2.1", 3)])
def test_containerd_config_is_accepted_by_containerd(label: str, version: int, tmp_path: Path):
    """containerd itself parses the section and shows polyshim as a runtime."""
    require_root()
    text = run(str(BIN / "polyshim"), "containerd-config", "--config-version", str(version),
               "--runtime-name", "poly").stdout.decode()  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text(text)
    dump = run(str(get_install(label).containerd), "--config", str(config), "config", "dump")
    assert dump.returncode == 0, dump.stderr.decode()
    out = dump.stdout.decode().replace("'", '"')  # 2.x dumps with single quotes
    assert "runtimes.poly]" in out
    assert (
        '"io.polyshim.*"' in out
        and '"run.oci.handler"' in out
        and 'runtime_type = "io.containerd.polyshim.v2"' in out
    )
    assert "/etc/polyshim/runtime.toml" in out
    for name in ("polyshim-overlay", "polyshim-erofs", "polyshim-blockfile"):
        assert f"proxy_plugins.{name}]" in out or f'proxy_plugins."{name}"]' in out, name


def test_shim_version_flag() -> None:
    result = run(str(BIN / "containerd-shim-polyshim-v2"), "-v")
    assert result.returncode == 0 and b"Version:" in result.stdout


def test_shim_info_answers_a_runtime_info() -> None:
    result = run(str(BIN / "containerd-shim-polyshim-v2"), "-info")
    info = introspection_pb2.RuntimeInfo.FromString(result.stdout)
    assert info.name == "io.containerd.polyshim.v2" and info.version.version
    assert info.features.type_url.endswith("/features/Features")


def test_shim_refuses_unknown_actions_and_flags() -> None:
    bad = run(str(BIN / "containerd-shim-polyshim-v2"), "-id", "x", "frobnicate")
    assert bad.returncode != 0 and b"unknown action" in bad.stderr and not bad.stdout
    bad = run(str(BIN / "containerd-shim-polyshim-v2"), "-nope")
    assert bad.returncode != 0 and b"not defined" in bad.stderr
