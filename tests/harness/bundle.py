"""OCI runtime bundles for driving runc (or a shim) directly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from .images import DEFAULT_PATH, busybox_rootfs


def make_bundle(
    dir: Path,
    args: list[str],
    rootfs: Path | None = None,
    terminal: bool = False,
    env: list[str] | None = None,
    annotations: dict[str, str] | None = None,
    hostname: str = "polyshim",
    runc: str = "runc",
) -> Path:
    """Create an OCI bundle in ``dir`` and return ``dir``.

    ``config.json`` is ``runc spec``'s default, edited: process args/terminal/env, annotations,
    a writable root and the hostname. The rootfs is a fresh busybox rootfs in ``dir/rootfs``,
    or ``rootfs`` (used in place) when given.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    exe = shutil.which(runc)
    if exe is None:
        raise FileNotFoundError(f"{runc} not found on PATH (run scripts/setup)")
    config_path = dir / "config.json"
    config_path.unlink(missing_ok=True)
    subprocess.run([exe, "spec"], cwd=dir, check=True, capture_output=True, text=True)
    spec = json.loads(config_path.read_text())

    if rootfs is None:
        busybox_rootfs(dir / "rootfs")
        root_path = "rootfs"
    else:
        root_path = str(Path(rootfs).resolve())

    process = spec["process"]
    process["args"] = list(args)
    process["terminal"] = terminal
    process["env"] = list(env) if env is not None else [f"PATH={DEFAULT_PATH}", "TERM=xterm"]
    spec["root"] = {"path": root_path, "readonly": False}
    spec["hostname"] = hostname
    if annotations:
        spec["annotations"] = dict(annotations)
    config_path.write_text(json.dumps(spec, indent=2) + "\n")
    return dir
