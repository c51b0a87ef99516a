"""Every backend polyshim ships, through the one conformance kit (shim_framework.testing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from backends.runc import RuncBackend
from backends.wasm import WasmBackend
from shim_framework.testing import MARKER, check_backend
from tests.harness import make_bundle, require_binary, require_root
from tests.harness.images import DEFAULT_PATH
from tests.harness.wasm import build_guest

pytestmark = pytest.mark.integration


class BusyboxPrograms:
    """The kit's programs as busybox shell one-liners, for runc."""

    def __init__(self, template: Path) -> None:
        self.template = template

    def bundle(self, directory: Path) -> Path:
        shutil.copytree(self.template, directory, symlinks=True)
        return directory

    def process(self, program: str, code: int = 0) -> dict[str, Any]:
        script = {
            "exit": f"echo {MARKER}; exit {code}",
            "sleep": "exec sleep 600",
            "echo-line": "read line; echo got: $line",
        }[program]
        return {"args": ["sh", "-c", script], "cwd": "/", "env": [f"PATH={DEFAULT_PATH}"],
                "user": {"uid": 0, "gid": 0}, "terminal": False}  # fmt: skip


class WasmPrograms:
    """The kit's programs as WASI guests."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs

    def bundle(self, directory: Path) -> Path:
        directory.mkdir(parents=True)
        config = {"ociVersion": "1.0.2", "root": {"path": str(self.rootfs)}, "process": {}}
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    def process(self, program: str, code: int = 0) -> dict[str, Any]:
        args = {
            "exit": ["/hello.wasm", str(code), MARKER],
            "sleep": ["/sleeper.wasm"],
            "echo-line": ["/cat_line.wasm"],
        }[program]
        return {"args": args, "cwd": "/", "env": [], "user": {"uid": 0, "gid": 0}}


def test_runc_backend_conforms(tmp_path: Path) -> None:
    require_root()
    require_binary("runc")
    template = make_bundle(tmp_path / "template", ["true"])
    check_backend(RuncBackend, BusyboxPrograms(template), tmp_path / "kit")


def test_wasm_backend_conforms(tmp_path: Path) -> None:
    require_root()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for guest in ("hello", "sleeper", "cat_line"):
        shutil.copy(build_guest(guest), rootfs / f"{guest}.wasm")
    check_backend(WasmBackend, WasmPrograms(rootfs), tmp_path / "kit")
