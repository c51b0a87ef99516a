"""One named snapshotter: containerd's snapshot semantics over the metadata store and a driver.

This is the plain-Python form of containerd's `Snapshotter` interface
(`core/snapshots/snapshotter.go`); `daemon/service.py` only decodes gRPC
requests, calls one method here and encodes the answer.

Every call runs exactly one metadata transaction and touches storage in the
order that keeps a crash harmless ("metadata first, disk second"):

- Prepare/View: inside the write transaction, the row is inserted and the
  driver creates the storage; the transaction commits last. A crash before
  the commit leaves storage without a row: garbage for Cleanup.
- Commit: a read transaction checks the request first (so a doomed commit
  costs no conversion); the driver converts the active (overlay: measures
  it), leaving it usable; the one write transaction checks everything again
  and flips the row to committed; the driver's `committed` hook tidies up
  afterwards. A crash at any point leaves either the active or the
  committed snapshot, whole.
- Remove: the transaction deletes the row, then the driver deletes the
  storage. A crash in between leaves garbage for Cleanup.
- Cleanup: under the write lock (so no Prepare is half done), storage that
  no row names is moved to the trash; the trash is deleted after the lock.

Slow work (a commit's conversion, a usage walk, deleting a tree) runs
outside the write lock, so one snapshotter's big layer does not stall the
others that share the database. A per-id guard keeps a Remove or Cleanup of
a snapshot from deleting its storage while its Commit is converting it.

Test hook: `pauses` (the daemon reads them from the environment variable
`POLYSHIM_SNAPSHOTD_TEST_PAUSES`, e.g. `commit.convert=0.2,commit.txn=0.2`)
sleeps that many seconds at named points of Commit, so crash tests can kill
the daemon there: `commit.convert` (before the driver converts),
`commit.txn` (metadata written, transaction not yet committed),
`commit.committed` (committed, before the driver's `committed` hook).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

from daemon.driver import Driver
from daemon.filters import parse_all
from daemon.model import Info, Kind, Mount, Usage, check_key, check_labels
from daemon.store import MetaStore
from shim_framework.errors import Unimplemented

log = logging.getLogger("polyshim.snapshotd")

PAUSE_POINTS = ("commit.convert", "commit.txn", "commit.committed")


class Snapshotter:
    """Snapshots of one name (the `snapshotter` field of every request) on one driver."""

    def __init__(
        self,
        name: str,
        store: MetaStore,
        driver: Driver,
        *,
        pauses: Mapping[str, float] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.driver = driver
        self.pauses = dict(pauses or {})
        unknown = set(self.pauses) - set(PAUSE_POINTS)
        if unknown:
            raise ValueError(f"unknown pause points {sorted(unknown)}; known: {PAUSE_POINTS}")
        self._cond = threading.Condition()
        self._busy: set[int] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Snapshotter {self.name} ({self.driver.name}) at {self.driver.root}>"

    # ------------------------------------------------------------------ the API

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """New active snapshot *key* on committed *parent*; its writable mounts.

        AlreadyExists: *key* exists. NotFound: no *parent*. InvalidArgument:
        *parent* is not committed."""
        return self._create(Kind.ACTIVE, key, parent, labels or {})

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """New read-only view *key* of committed *parent*; its mounts. Errors as `prepare`."""
        return self._create(Kind.VIEW, key, parent, labels or {})

    def mounts(self, key: str) -> list[Mount]:
        """The mounts Prepare/View returned for *key*. NotFound; FailedPrecondition: committed."""
        check_key(key)
        with self.store.transaction(write=False) as tx:
            snap = tx.get_snapshot(key)
        return self.driver.mounts(snap)

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        """Turn active *key* into committed *name* with exactly *labels*; *key* is gone after.

        AlreadyExists: *name* exists. NotFound: no *key*. FailedPrecondition:
        *key* is a view or committed. *parent* (2.2+ rebase) needs the
        driver's "rebase" capability, else Unimplemented."""
        labels = dict(labels or {})
        check_key(name, "name")
        check_key(key)
        if parent:
            check_key(parent, "parent")
        check_labels(labels)
        with self.store.transaction(write=False) as tx:
            snap = tx.check_commit(name, key, parent)
            rebase = bool(parent) and not tx.get_info(key)[1].parent
        if rebase and "rebase" not in self.driver.capabilities:
            raise Unimplemented(
                f'snapshotter "{self.name}" ({self.driver.name}) cannot commit onto a new parent '
                "(rebase); it does not have the rebase capability"
            )
        with self._guard(snap.id):
            self._pause("commit.convert")
            try:
                usage = self.driver.convert(snap)
            except Exception:
                # Removed meanwhile? Then say that, not what the driver tripped over.
                with self.store.transaction(write=False) as tx:
                    tx.check_commit(name, key, parent)
                raise
            self.driver.sync(snap.id)
            with self.store.transaction(write=True) as tx:
                committed = tx.commit_active(name, key, usage, labels, parent, expect_id=snap.id)
                self._pause("commit.txn")
            self._pause("commit.committed")
            try:
                self.driver.committed(committed)
            except Exception:
                log.exception("%s: post-commit step for %r failed (harmless leftovers)", self, name)
        log.debug("%s: committed %r as %r (id %d)", self, key, name, snap.id)

    def remove(self, key: str) -> None:
        """Remove *key* of any kind; its storage goes right after.

        NotFound: no *key*. FailedPrecondition: it has children."""
        check_key(key)
        with self.store.transaction(write=True) as tx:
            sid, _ = tx.remove(key)
        with self._guard(sid):
            try:
                self.driver.remove(sid)
            except Exception:
                log.exception("%s: deleting storage of removed %r (id %d) failed; Cleanup retries",
                              self, key, sid)  # fmt: skip
        log.debug("%s: removed %r (id %d)", self, key, sid)

    def stat(self, key: str) -> Info:
        """Info of *key*. NotFound: no *key*."""
        check_key(key)
        with self.store.transaction(write=False) as tx:
            return tx.get_info(key)[1]

    def update(self, info: Info, paths: Sequence[str] = ()) -> Info:
        """Update the labels of *info.name* as *paths* say (see `Transaction.update_info`).

        InvalidArgument: empty name, a path other than labels, a bad label. NotFound."""
        check_key(info.name, "name")
        check_labels(info.labels)
        with self.store.transaction(write=True) as tx:
            return tx.update_info(info, paths)

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching any of *filters* (all when none). InvalidArgument: bad filter."""
        match = parse_all(filters)
        with self.store.transaction(write=False) as tx:
            infos = tx.infos()
        return [info for info in infos if match(info)]

    def usage(self, key: str) -> Usage:
        """Resources *key* takes itself: recorded at commit, measured now for an active.

        NotFound: no *key*."""
        check_key(key)
        with self.store.transaction(write=False) as tx:
            found = tx.get_usage(key)
        return found if isinstance(found, Usage) else self.driver.usage(found)

    def cleanup(self, purge: bool = True) -> list[int]:
        """Delete storage no snapshot owns (crash leftovers, failed deletions); return its ids.

        With *purge* False the garbage is only moved to the trash (fast); the
        caller deletes it later with `driver.purge()`."""
        with self.store.transaction(write=True) as tx:
            live = set(tx.ids())
            with self._cond:
                busy = set(self._busy)
            garbage = sorted(self.driver.storage_ids() - live - busy)
            for sid in garbage:
                log.info("%s: cleanup: storage of id %d belongs to no snapshot", self, sid)
                self.driver.discard(sid)
            for name in self.driver.discard_strays():
                log.warning("%s: cleanup: %r in snapshots/ is not a snapshot id", self, name)
        if purge:
            self.driver.purge()
        return garbage

    def restore(self) -> dict[int, str]:
        """Recreate the storage of active snapshots and views that a power loss took (their
        rows were synced before Prepare/View replied, their storage is synced only at Commit:
        see `Driver.sync`); return what stays lost (id -> key): committed snapshots, and
        actives whose parent is lost. Runs at start-up."""
        lost = {}
        with self.store.transaction(write=True) as tx:
            on_disk = self.driver.storage_ids()
            for sid, key in tx.ids().items():
                if sid in on_disk:
                    continue
                try:
                    snap = tx.get_snapshot(key)
                    self.driver.create(snap, tx.get_info(key)[1].labels)
                except Exception as exc:
                    lost[sid] = key
                    log.debug("%s: cannot recreate storage of %r (id %d): %s", self, key, sid, exc)
                else:
                    log.warning("%s: %s %r (id %d) had no storage (lost in a crash?); recreated "
                                "it empty", self, snap.kind.name.lower(), key, sid)  # fmt: skip
        return lost

    def close(self) -> None:
        """Release the driver. Idempotent; the shared Database is closed by its owner."""
        if self._closed:
            return
        self._closed = True
        self.driver.close()

    # ------------------------------------------------------------------ helpers

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        check_key(key)
        if parent:
            check_key(parent, "parent")
        check_labels(labels)
        with self.store.transaction(write=True) as tx:
            snap = tx.create_snapshot(kind, key, parent, labels)
            try:
                self.driver.create(snap, labels)
            except BaseException:
                # Still under the write lock: nobody else can have been given this id.
                with contextlib.suppress(Exception):
                    self.driver.discard(snap.id)
                raise
        log.debug("%s: %s %r on %r (id %d)", self, kind, key, parent, snap.id)
        return self.driver.mounts(snap)

    @contextlib.contextmanager
    def _guard(self, sid: int) -> Iterator[None]:
        """Run the block as the only storage work on *sid* (Commit vs Remove/Cleanup)."""
        with self._cond:
            while sid in self._busy:
                self._cond.wait()
            self._busy.add(sid)
        try:
            yield
        finally:
            with self._cond:
                self._busy.discard(sid)
                self._cond.notify_all()

    def _pause(self, point: str) -> None:
        delay = self.pauses.get(point)
        if delay:
            log.warning("%s: test pause %s for %.3fs", self, point, delay)
            time.sleep(delay)


def parse_pauses(text: str) -> dict[str, float]:
    """`commit.convert=0.2,commit.txn=0.1` -> {point: seconds}; ValueError on anything else."""
    pauses = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, sep, seconds = item.partition("=")
        if not sep or point not in PAUSE_POINTS:
            raise ValueError(
                f"bad pause {item!r}; expected POINT=SECONDS, POINT one of {PAUSE_POINTS}"
            )
        pauses[point] = float(seconds)
    return pauses
