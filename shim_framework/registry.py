"""Finding backends: every installed distribution's `polyshim.backends` entry points.

polyshim's own backends register there too (pyproject.toml), so a
third-party backend installed with pip is found the same way and needs no
change here. Loading is lazy: a shim imports only the backend it runs.
"""

from __future__ import annotations

import importlib.metadata
import threading

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

    @property
    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = {
                ep.name: Entry(ep.name, ep.value, ep.dist.name if ep.dist else "?")
                for ep in importlib.metadata.entry_points(group=GROUP)
            }
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
