"""Finding backends: every installed distribution's `polyshim.backends` entry points.

polyshim's own backends register there too (pyproject.toml), so a
third-party backend installed with pip is found the same way and needs no
change here. Loading is lazy: a shim imports only the backend it runs.

The entry points are read straight from the `entry_points.txt` files of the
distributions on `sys.path`, first one wins, as `importlib.metadata` would
find them: importing `importlib.metadata` costs every shim start ~15 ms (it
pulls in the email package), for a few lines of INI. They are read once per
process (~2 ms a Create paid before); the warm template reads them for all its
forks, and starts afresh when a distribution is installed or removed (see
template.py).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
from collections.abc import Iterator

import attrs

from shim_framework.backend import Backend, Probe
from shim_framework.errors import InvalidArgument

GROUP = "polyshim.backends"


@attrs.frozen
class Entry:
    name: str
    target: str  # "module:Class"
    distribution: str


class Registry:
    """The backends installed in this Python environment."""

    def __init__(self, entries: dict[str, Entry] | None = None) -> None:
        self._entries = entries
        self._classes: dict[str, type[Backend]] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, *backends: type[Backend]) -> Registry:
        """A registry of exactly these classes (tests, the conformance kit)."""
        registry = cls({b.name: Entry(b.name, f"{b.__module__}:{b.__qualname__}", "-")
                        for b in backends})  # fmt: skip
        registry._classes.update({b.name: b for b in backends})
        return registry

    @property
    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = _installed()
        return self._entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def load(self, name: str) -> type[Backend]:
        """The backend class registered as *name*; InvalidArgument when there is none."""
        with self._lock:
            cls = self._classes.get(name)
            if cls is not None:
                return cls
            entry = self.entries.get(name)
            if entry is None:
                known = ", ".join(self.names()) or "none"
                raise InvalidArgument(
                    f'backend "{name}": no such backend is installed (installed: {known}); '
                    f"check the io.polyshim.backend annotation or the runtime's default_backend"
                )
            module_name, _, attr = entry.target.partition(":")
            module = importlib.import_module(module_name)
            cls = getattr(module, attr)
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise InvalidArgument(
                    f'backend "{name}": {entry.target} (from {entry.distribution}) is not a '
                    "polyshim Backend subclass"
                )
            self._classes[name] = cls
            return cls

    def probe(self, name: str, config: dict) -> Probe:
        """Whether *name* can run here; an import failure of its module is a bug, not a no."""
        return self.load(name).probe(config)


@functools.cache
def _installed() -> dict[str, Entry]:
    """This process's entry points, read once (shared by every Registry: none changes it)."""
    return installed_entries(GROUP)


def installed_entries(group: str, paths: list[str] | None = None) -> dict[str, Entry]:
    """Entry points of *group* from `*.dist-info/entry_points.txt` on *paths* (sys.path)."""
    found: dict[str, Entry] = {}
    seen_dists: set[str] = set()
    for directory, name in _distributions(paths):
        dist = name.rsplit("-", 1)[0] if name.endswith(".dist-info") else name[:-9]
        dist = dist.split("-")[0]
        if dist.lower() in seen_dists:
            continue  # shadowed by an earlier path entry
        seen_dists.add(dist.lower())
        try:
            with open(os.path.join(directory, name, "entry_points.txt")) as f:
                text = f.read()
        except OSError:
            continue
        for key, value in _section(text, group):
            found.setdefault(key, Entry(key, value, dist))
    return found


def distributions_stamp(paths: list[str] | None = None) -> str:
    """Changes when what `installed_entries` reads may have: a distribution installed,
    removed, upgraded, or its entry_points.txt rewritten."""
    parts = []
    for directory, name in _distributions(paths):
        try:
            mtime = os.stat(os.path.join(directory, name, "entry_points.txt")).st_mtime_ns
        except OSError:
            mtime = 0
        parts.append(f"{directory}/{name}:{mtime}")
    return "\n".join(parts)


def _distributions(paths: list[str] | None) -> Iterator[tuple[str, str]]:
    """(directory, name) of every *.dist-info and *.egg-info on *paths* (sys.path), in order."""
    for directory in paths if paths is not None else sys.path:
        try:
            names = sorted(os.listdir(directory or "."))
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                yield directory, name


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """`name = value` lines of INI section [group]."""
    lines, inside = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            inside = line == f"[{group}]"
        elif inside and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            lines.append((key.strip(), value.strip()))
    return lines
