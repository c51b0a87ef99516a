"""Paths inside a container's root filesystem, resolved without leaving it."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shim_framework.errors import InvalidArgument, NotFound

MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)


def resolve_in_root(root: Path, path: str, *, must_exist: bool = True) -> Path:
    """The host path of *path* as the container sees it: `..` stops at the root and
    symlinks, absolute or relative, are followed inside it (continuity's `fs.RootPath`).
    NotFound if missing, unless not *must_exist* (a mount target to be created)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            if must_exist:
                raise NotFound(f"{path}: no such file in the container's rootfs") from None
            mode = 0
        if stat.S_ISLNK(mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise InvalidArgument(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def entrypoint(spec: Mapping[str, Any], root: Path) -> Path | None:
    """The file `process.args[0]` names, looked up like execvp in the container
    (PATH from the spec's env, relative to `process.cwd`); None when absent.

    `path#function` (crun's and runwasi's way to name a wasm entry) finds `path`
    when no file carries the whole name."""
    process = spec.get("process") or {}
    args = process.get("args") or []
    if not args or not args[0]:
        return None
    found = _lookup(process, root, args[0])
    if found is None and "#" in args[0]:
        found = _lookup(process, root, args[0].split("#", 1)[0])
    return found


def _lookup(process: Mapping[str, Any], root: Path, name: str) -> Path | None:
    if "/" in name:
        cwd = process.get("cwd") or "/"
        candidates = [name if name.startswith("/") else f"{cwd}/{name}"]
    else:
        env = dict(e.split("=", 1) for e in process.get("env") or [] if "=" in e)
        search = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        candidates = [f"{d or '.'}/{name}" for d in search.split(":")]
    for candidate in candidates:
        try:
            found = resolve_in_root(root, candidate)
        except (NotFound, InvalidArgument):
            continue
        if found.is_file():
            return found
    return None
