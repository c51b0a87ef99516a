"""`polyshim-snapshotd`: the proxy snapshotter daemon containerd reaches through `[proxy_plugins]`.

Without --snapshotters the daemon serves every driver that is available and
whose probe passes on this host (the others are skipped with the reason);
a driver named in --snapshotters that cannot run is an error.

Start-up: take the root's lock (one daemon per root), open the metadata
database, create each snapshotter's driver below `<root>/<name>`, repair what
a crash may have left (storage without metadata goes to the trash at once and
is deleted in the background; metadata without storage is logged), then
serve. SIGTERM or SIGINT: finish in-flight calls (up to 10 s), close, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from daemon import registry
from daemon.driver import Driver, DriverOptions
from daemon.snapshotter import Snapshotter, parse_pauses
from daemon.store import Database
from shim_framework.errors import FailedPrecondition, PolyshimError

log = logging.getLogger("polyshim.snapshotd")

DEFAULT_ROOT = Path("/var/lib/polyshim-snapshotd")
DEFAULT_SOCKET = Path("/run/polyshim-snapshotd/snapshotd.sock")
PAUSES_ENV = "POLYSHIM_SNAPSHOTD_TEST_PAUSES"
STOP_GRACE = 10.0

# Sizes of writable images: ext4 needs some room; 16 TiB is ext4's file size limit at 4 KiB blocks.
MIN_IMAGE_SIZE = 1 << 20
MAX_IMAGE_SIZE = 16 << 40
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


class Daemon:
    """What one polyshim-snapshotd runs: the root lock, the database and its snapshotters.

    *drivers* maps each snapshotter name to a function making its driver
    from the driver's root (`<root>/<name>`). Resource handling: `close()`
    closes snapshotters, database and lock, in that order; idempotent."""

    def __init__(
        self,
        root: Path,
        drivers: Mapping[str, Callable[[Path], Driver]],
        *,
        pauses: Mapping[str, float] | None = None,
    ) -> None:
        self.root = Path(root)
        self.snapshotters: dict[str, Snapshotter] = {}
        self._lock_fd: int | None = None
        self.db: Database | None = None
        self._purger: threading.Thread | None = None
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = _lock_root(self.root)
            self.db = Database(self.root / "metadata.db")
            for name, make in drivers.items():
                registry.check_name(name)
                driver = make(self.root / name)
                self.snapshotters[name] = Snapshotter(
                    name, self.db.store(name), driver, pauses=pauses
                )
            self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> None:
        for sn in self.snapshotters.values():
            for sid, key in sn.restore().items():
                log.error("%s: snapshot %r (id %d) has no storage on disk; remove it", sn, key, sid)
            garbage = sn.cleanup(purge=False)
            if garbage:
                log.info("%s: %d leftover storage entries moved to the trash", sn, len(garbage))

    def purge_in_background(self) -> threading.Thread:
        """Delete the trash of every snapshotter in a daemon thread (start-up recovery)."""

        def purge() -> None:
            for sn in list(self.snapshotters.values()):
                try:
                    sn.driver.purge()
                except Exception:
                    log.exception("%s: purging the trash failed", sn)

        self._purger = threading.Thread(target=purge, name="snapshotd-purge", daemon=True)
        self._purger.start()
        return self._purger

    def close(self) -> None:
        for sn in self.snapshotters.values():
            with contextlib.suppress(Exception):
                sn.close()
        if self.db is not None:
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock_root(root: Path) -> int:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FailedPrecondition(
            f"{root} is in use by another polyshim-snapshotd (pid {holder}); "
            "each daemon needs its own --root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def parse_size(text: str) -> int:
    """`64M`, `1.5GiB`, `1048576` -> bytes (binary units, as containerd's `default_size`)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64M, 1G, 1048576)")
    size = int(float(match.group(1)) * (1 << _UNITS[match.group(2).lower()]))
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {size} bytes; image sizes must be between 1 MiB and 16 TiB"
        )
    return size


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of threads from 1 to 1024")
    return int(text)


def _snapshotters(text: str) -> dict[str, str]:
    try:
        return registry.parse_snapshotters(text)
    except PolyshimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    available = registry.available()
    drivers = ", ".join(
        d if d in available else f"{d} (not available yet)" for d in registry.DRIVERS
    )
    parser = argparse.ArgumentParser(
        prog="polyshim-snapshotd",
        description=(
            "Serve containerd's snapshots API (containerd.services.snapshots.v1) on a unix "
            "socket for containerd's [proxy_plugins]: overlay, erofs and blockfile "
            "snapshotters with one SQLite metadata store."
        ),
        epilog=(
            f"Drivers: {drivers}. Each --snapshotters item is DRIVER, served under the name "
            f"{registry.DEFAULT_PREFIX}DRIVER, or NAME=DRIVER; containerd's config names the "
            "same NAME in [proxy_plugins.NAME] (print it with --print-containerd-config). "
            "Names of containerd's built-in snapshotters (overlayfs, erofs, blockfile, ...) "
            "are refused: containerd 2.x does not start with such a proxy."
        ),
    )
    parser.add_argument(
        "--root",
        type=Path,
        metavar="DIR",
        default=DEFAULT_ROOT,
        help="directory for the metadata database (ROOT/metadata.db) and all snapshots "
        "(ROOT/NAME/snapshots/ID); one daemon per root (default: %(default)s)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help="unix socket serving every snapshotter, created with mode 0600 (default: %(default)s)",
    )
    parser.add_argument(
        "--socket-dir",
        type=Path,
        metavar="DIR",
        help="also serve each snapshotter alone on DIR/NAME.sock",
    )
    parser.add_argument(
        "--snapshotters",
        type=_snapshotters,
        metavar="LIST",
        help="comma-separated DRIVER or NAME=DRIVER items (default: every available driver)",
    )
    parser.add_argument(
        "--blockfile-size",
        type=parse_size,
        metavar="SIZE",
        help="size of a new blockfile image, e.g. 512M or 2G (1 MiB to 16 TiB; "
        "default: the driver's)",
    )
    parser.add_argument(
        "--overlay-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra overlay mount option (repeatable), e.g. metacopy=on",
    )
    parser.add_argument(
        "--max-workers",
        type=_workers,
        default=16,
        metavar="N",
        help="gRPC worker threads (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log to stderr at this level (default: %(default)s)",
    )
    parser.add_argument(
        "--print-containerd-config",
        type=int,
        choices=(2, 3),
        metavar="VERSION",
        help="print the [proxy_plugins] TOML for containerd config VERSION (2: containerd "
        "1.6/1.7, 3: 2.x) for these settings and exit",
    )
    return parser


def _setup_logging(level: str) -> None:
    from shim_framework.logfmt import LogfmtFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter({}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    spec: dict[str, str] = args.snapshotters or {
        registry.DEFAULT_PREFIX + d: d for d in registry.available()
    }

    if args.print_containerd_config:
        from daemon.config import proxy_plugins_toml

        sys.stdout.write(
            proxy_plugins_toml(
                spec,
                args.socket,
                config_version=args.print_containerd_config,
                root=args.root,
                socket_dir=args.socket_dir,
            )
        )
        return 0

    try:
        pauses = parse_pauses(os.environ.get(PAUSES_ENV, ""))
    except ValueError as exc:
        parser.error(f"{PAUSES_ENV}: {exc}")
    options = DriverOptions(
        blockfile_size=args.blockfile_size, mount_options=tuple(args.overlay_option)
    )
    factories: dict[str, Callable[[Path], Driver]] = {}
    for name, driver in spec.items():
        try:
            cls = registry.load(driver)
        except PolyshimError as exc:
            log.error("snapshotter %s: %s", name, exc)
            return 1
        probe = cls.probe(args.root / name)
        if not probe.ok:
            if args.snapshotters:  # asked for by name: an error
                log.error(
                    "snapshotter %s: driver %s cannot run here: %s", name, driver, probe.reason
                )
                return 1
            log.warning("skipping %s: driver %s cannot run here: %s", name, driver, probe.reason)
            continue
        factories[name] = lambda r, cls=cls: cls(r, options)
    if not factories:
        log.error("no driver can run here; nothing to serve")
        return 1
    spec = {name: spec[name] for name in factories}

    os.umask(0o077)  # sockets and files are ours alone; drivers set directory modes explicitly
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    from daemon.service import Server

    try:
        daemon = Daemon(args.root, factories, pauses=pauses)
    except (PolyshimError, OSError, ValueError, sqlite3.Error) as exc:
        log.error("cannot start: %s", exc)
        return 1
    sockets: dict[Path, str | None] = {args.socket: None}
    if args.socket_dir is not None:
        sockets.update({args.socket_dir / f"{name}.sock": name for name in spec})
    server = Server(daemon.snapshotters, sockets, max_workers=args.max_workers)
    try:
        server.start()
    except (PolyshimError, OSError, RuntimeError) as exc:
        log.error("cannot serve: %s", exc)
        daemon.close()
        return 1
    daemon.purge_in_background()
    served = ", ".join(f"{n} ({d})" for n, d in spec.items())
    log.info("serving %s on %s (root %s)", served, ", ".join(map(str, sockets)), args.root)
    if pauses:
        log.warning("test pauses active: %s", pauses)
    try:
        while not stop.wait(3600):
            pass
    finally:
        log.info("stopping")
        server.stop(STOP_GRACE)
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
