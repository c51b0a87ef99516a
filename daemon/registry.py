"""The drivers polyshim-snapshotd knows, and the names snapshotters are served under.

Adding a driver is one line in `DRIVERS`. A driver whose module does not
exist yet is listed but unavailable: the daemon serves it only once
`daemon/<module>.py` is there, so drivers land one at a time.

Snapshotter names are what containerd puts in `[proxy_plugins.NAME]` and in
the `snapshotter` field of every request. `--snapshotters` takes DRIVER
(served as `polyshim-DRIVER`) or NAME=DRIVER items. A name must not be one
of containerd's built-in snapshotter ids: containerd 2.x panics at start-up
when a proxy plugin has the id of a built-in plugin (checked with 2.1.9 and
`[proxy_plugins.erofs]`), which is why the default names carry a prefix.
"""

from __future__ import annotations

import importlib
import logging
import re

from daemon.driver import Driver
from shim_framework.errors import InvalidArgument, Unimplemented

log = logging.getLogger("polyshim.snapshotd")

#: driver name -> "module:class"
DRIVERS: dict[str, str] = {
    "overlay": "daemon.overlay:OverlayDriver",
    "erofs": "daemon.erofs:ErofsDriver",
    "blockfile": "daemon.blockfile:BlockfileDriver",
}

DEFAULT_PREFIX = "polyshim-"

#: Ids of containerd's built-in snapshotters (1.6 to 2.x, all platforms).
BUILTIN_SNAPSHOTTERS = frozenset(
    {"overlayfs", "native", "btrfs", "devmapper", "zfs", "aufs", "blockfile", "erofs",
     "windows", "windows-lcow", "lcow"}
)  # fmt: skip

# Names end up as directory names below the root and as TOML keys: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def load(driver: str) -> type[Driver]:
    """The class of *driver*. InvalidArgument: unknown. Unimplemented: not written yet."""
    if driver not in DRIVERS:
        raise InvalidArgument(f'unknown driver "{driver}" (known: {", ".join(DRIVERS)})')
    module, _, cls = DRIVERS[driver].partition(":")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise Unimplemented(
            f'driver "{driver}" is not available yet ({module} is missing)'
        ) from exc
    return getattr(found, cls)


def available() -> list[str]:
    """Drivers whose module exists and imports, in `DRIVERS` order.

    A module that fails to import is left out (and logged): one broken
    driver must not take `--help` or the other drivers down with it."""
    found = []
    for driver in DRIVERS:
        try:
            load(driver)
        except Unimplemented:
            continue
        except Exception:
            log.exception('driver "%s" does not load; leaving it out', driver)
            continue
        found.append(driver)
    return found


def check_name(name: str) -> None:
    """InvalidArgument unless *name* can name a snapshotter for containerd 1.6 to 2.x."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f'snapshotter name "{name}": use 1-63 letters, digits, ".", "_" or "-", '
            "starting with a letter or digit"
        )
    if name in BUILTIN_SNAPSHOTTERS:
        raise InvalidArgument(
            f'snapshotter name "{name}" is a containerd built-in snapshotter; containerd 2.x '
            f'refuses to start with a proxy of that name (use e.g. "{DEFAULT_PREFIX}{name}")'
        )


def parse_snapshotters(spec: str) -> dict[str, str]:
    """`overlay,fast=erofs` -> {"polyshim-overlay": "overlay", "fast": "erofs"} (name -> driver).

    InvalidArgument: an unknown driver, a bad or duplicate name, an empty list."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, driver = item.partition("=")
        if not sep:
            name, driver = DEFAULT_PREFIX + item, item
        name, driver = name.strip(), driver.strip()
        if driver not in DRIVERS:
            raise InvalidArgument(
                f'unknown driver "{driver}" in "{item}" (known: {", ".join(DRIVERS)})'
            )
        check_name(name)
        if name in result:
            raise InvalidArgument(f'snapshotter name "{name}" is given twice')
        result[name] = driver
    if not result:
        raise InvalidArgument("no snapshotters given")
    return result
