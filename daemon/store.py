"""Snapshot metadata in SQLite: one database per daemon root, one transaction per API call.

Theory of operation. Every snapshotter the daemon serves keeps its rows in
the same `metadata.db`, keyed by (snapshotter name, key). A row is the whole
truth about a snapshot: kind, parent, times, labels and, once committed, its
usage. Storage on disk is addressed by the row's integer `id` (SQLite
AUTOINCREMENT: an id that was ever committed is never handed out again, even
after its row is deleted), so keys, which containerd fills with `/`, `:` and
spaces, never become file names.

The rules are those of containerd's reference metastore
(`core/snapshots/storage/bolt.go`): one key space for actives, views and
committed snapshots; parents must be committed; a snapshot with children of
any kind cannot be removed; Commit keeps the id, replaces the labels and
resets both times; Update may change labels only.

`MetaStore.transaction(write)` is shaped like containerd's
`MetaStore.WithTransaction`: the service opens exactly one per API call and
does all metadata work of that call inside it. Writers are serialised by one
lock per database (SQLite allows one writer anyway; the lock makes waiting
cheap and fair instead of a busy-retry loop); readers never wait, WAL gives
each a consistent snapshot.

Crash safety: a transaction commits entirely or not at all, so a crash
leaves the metadata as it was before or after each API call, never in
between. Storage follows metadata (see `daemon/driver.py`): it is created
inside the creating transaction before it commits and removed after the
removing transaction committed, so storage without a row is garbage and
`Cleanup` may delete it, while a row always has its storage (after a power loss,
actives and views whose storage was not synced yet get it back at start-up: see
`Driver.sync`).

Durability: every write transaction is on disk before the reply to its API
call (`synchronous=FULL`: the WAL is synced at COMMIT), as with containerd's
own snapshotters (the bolt metastore of its overlay snapshotter syncs every
Prepare too). containerd records durably what we acknowledged, Prepare and
View included, so no write may be relaxed to NORMAL (consistent after a
crash, but a power loss may roll back the last transactions): after a lost
Prepare or Commit containerd's database would name a snapshot we no longer
know, after a lost Remove we would hold a row whose storage is deleted. That
fsync is about half of a Prepare's time in the daemon, and worth it. The
storage of actives and views is synced only at Commit: see `Driver.sync`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from daemon.model import Info, Kind, Snapshot, Usage
from shim_framework.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger("polyshim.snapshotd.store")

SCHEMA_VERSION = 1

_SCHEMA = (
    """
    CREATE TABLE snapshots (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- storage id, never reused
        snapshotter TEXT    NOT NULL,
        key         TEXT    NOT NULL,                   -- active/view key or committed name
        kind        INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),  -- view, active, committed
        parent_id   INTEGER REFERENCES snapshots (id),  -- committed, same snapshotter
        created     INTEGER NOT NULL,                   -- ns since the epoch, UTC
        updated     INTEGER NOT NULL,
        size        INTEGER,                            -- usage, recorded at commit
        inodes      INTEGER,
        UNIQUE (snapshotter, key)
    )
    """,
    "CREATE INDEX snapshots_by_parent ON snapshots (parent_id)",
    """
    CREATE TABLE labels (
        snapshot_id INTEGER NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
        name        TEXT    NOT NULL,
        value       TEXT    NOT NULL,
        PRIMARY KEY (snapshot_id, name)
    ) WITHOUT ROWID
    """,
)

_BUSY_TIMEOUT = 30.0  # seconds; only another process on the same file can make us wait


class Database:
    """The metadata file of one daemon root, shared by all snapshotters it serves.

    Resource handling: connections are pooled and reused by whichever thread
    runs a transaction; `close()` closes them all and is idempotent. After it,
    transactions fail with Unavailable."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # guards _idle and _closed
        self._write_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._closed = False
        created = not self.path.exists()
        conn = self._connect()
        try:
            # WAL is a property of the file and survives reopening.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise FailedPrecondition(f"{self.path}: cannot use WAL journaling (got {mode})")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        if created:
            os.chmod(self.path, 0o600)
        self._idle.append(conn)
        self._all.append(conn)

    def store(self, snapshotter: str) -> MetaStore:
        """The rows of one snapshotter."""
        return MetaStore(self, snapshotter)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._all, self._idle = self._all, [], []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (Python 3.11 has no autocommit=).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=_BUSY_TIMEOUT)  # fmt: skip
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # see the module's Durability
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"{self.path}: metadata schema version {version} is newer than this "
                f"polyshim-snapshotd understands ({SCHEMA_VERSION}); run a newer version"
            )
        # Schema and version in one transaction (executescript would commit after each part).
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise Unavailable("snapshot metadata store is closed (the daemon is stopping)")
            if self._idle:
                return self._idle.pop()
        conn = self._connect()
        with self._lock:
            if self._closed:
                conn.close()
                raise Unavailable("snapshot metadata store is closed (the daemon is stopping)")
            self._all.append(conn)
        return conn

    def _release(self, conn: sqlite3.Connection, broken: bool) -> None:
        with self._lock:
            if broken or self._closed:
                if conn in self._all:
                    self._all.remove(conn)
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            else:
                self._idle.append(conn)


class MetaStore:
    """The metadata of one named snapshotter inside a `Database`."""

    def __init__(self, db: Database, snapshotter: str) -> None:
        self.db = db
        self.snapshotter = snapshotter

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[Transaction]:
        """One transaction: committed when the block ends normally, rolled back on any error.

        Write transactions run one at a time; read transactions see a
        consistent snapshot and never wait for writers. A write is on disk once the
        block has ended (see the module's Durability)."""
        db = self.db
        conn = db._acquire()
        broken = False
        try:
            with db._write_lock if write else contextlib.nullcontext():
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield Transaction(conn, self.snapshotter, write)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            broken = True
                            log.exception("store: rollback failed; dropping the connection")
                    raise
        except sqlite3.Error:
            broken = True
            raise
        finally:
            db._release(conn, broken)


class Transaction:
    """Metadata operations of one snapshotter inside one transaction.

    Each method states the rule it enforces and the error it raises;
    messages put the snapshot first, as containerd's do."""

    def __init__(self, conn: sqlite3.Connection, snapshotter: str, writable: bool) -> None:
        self._conn = conn
        self.snapshotter = snapshotter
        self.writable = writable

    # ------------------------------------------------------------------ reads

    def get_info(self, key: str) -> tuple[int, Info]:
        """(id, info) of any snapshot. NotFound: no *key*."""
        row = self._get(key)
        return row[0], self._info(key, row)

    def get_snapshot(self, key: str) -> Snapshot:
        """The active snapshot or view *key* with its parent chain.

        NotFound: no *key*. FailedPrecondition: *key* is committed."""
        row = self._get(key)
        if row[1] not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(
                f'snapshot "{key}" is committed; only active snapshots and views have mounts'
            )
        return self._snapshot(row)

    def get_usage(self, key: str) -> Usage | Snapshot:
        """Committed *key*'s recorded usage, else the active snapshot or view *key* (whose
        usage the driver measures), from one row. NotFound: no *key*."""
        row = self._get(key)
        if row[1] == Kind.COMMITTED:
            return Usage(row[5] or 0, row[6] or 0)
        return self._snapshot(row)

    def infos(self) -> list[Info]:
        """Every snapshot of this snapshotter, ordered by key."""
        labels: dict[int, dict[str, str]] = {}
        for sid, name, value in self._conn.execute(
            "SELECT l.snapshot_id, l.name, l.value FROM labels l "
            "JOIN snapshots s ON s.id = l.snapshot_id WHERE s.snapshotter = ?",
            (self.snapshotter,),
        ):
            labels.setdefault(sid, {})[name] = value
        rows = self._conn.execute(
            "SELECT s.id, s.key, s.kind, p.key, s.created, s.updated FROM snapshots s "
            "LEFT JOIN snapshots p ON p.id = s.parent_id "
            "WHERE s.snapshotter = ? ORDER BY s.key",
            (self.snapshotter,),
        )
        return [
            Info(key, parent or "", Kind(kind), created, updated, labels.get(sid, {}))
            for sid, key, kind, parent, created, updated in rows
        ]

    def ids(self) -> dict[int, str]:
        """Storage id -> key of every snapshot of this snapshotter (what Cleanup keeps)."""
        return dict(
            self._conn.execute(
                "SELECT id, key FROM snapshots WHERE snapshotter = ?", (self.snapshotter,)
            )
        )

    def check_commit(self, name: str, key: str, parent: str = "") -> Snapshot:
        """The snapshot Commit would turn *key* into, without writing anything.

        Errors as `commit_active`; the returned Snapshot carries the key's id,
        kind ACTIVE and the parent chain the committed snapshot will have."""
        row, parent_id = self._commit_target(name, key, parent)
        return Snapshot(row[0], Kind.ACTIVE, self._chain(parent_id))

    # ------------------------------------------------------------------ writes

    def create_snapshot(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Snapshot:
        """Record a new active snapshot or view *key* on committed *parent* ("" for none).

        NotFound: no *parent*. InvalidArgument: *parent* is not committed.
        AlreadyExists: *key* names any snapshot (one key space)."""
        self._require_write()
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind}: only active snapshots and views")
        parent_id = None
        if parent:
            prow = self._find(parent)
            if prow is None:
                raise NotFound(f'parent snapshot "{parent}": not found')
            if prow[1] != Kind.COMMITTED:
                raise InvalidArgument(
                    f'parent snapshot "{parent}" is {Kind(prow[1])}, not committed; '
                    "only committed snapshots can be parents"
                )
            parent_id = prow[0]
        if self._find(key) is not None:
            raise AlreadyExists(f'snapshot "{key}": already exists')
        now = time.time_ns()
        sid = self._conn.execute(
            "INSERT INTO snapshots (snapshotter, key, kind, parent_id, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (self.snapshotter, key, int(kind), parent_id, now, now),
        ).fetchone()[0]
        self._write_labels(sid, labels)
        return Snapshot(sid, kind, self._chain(parent_id))

    def commit_active(
        self,
        name: str,
        key: str,
        usage: Usage,
        labels: Mapping[str, str],
        parent: str = "",
        expect_id: int | None = None,
    ) -> Snapshot:
        """Turn active *key* into committed *name*, same id; *key* is gone afterwards.

        The labels are replaced (not inherited), both times reset, *usage*
        recorded. *parent* (2.2+ rebase) gives a parentless active its parent.
        AlreadyExists: *name* taken (checked first). NotFound: no *key*, or no
        *parent*. FailedPrecondition: *key* is not active, *parent* not
        committed, or *key* no longer has id *expect_id*. InvalidArgument:
        *parent* differs from the active's own parent."""
        self._require_write()
        row, parent_id = self._commit_target(name, key, parent)
        if expect_id is not None and row[0] != expect_id:
            raise FailedPrecondition(
                f'snapshot "{key}" was removed and prepared again while it was being '
                "committed; commit again"
            )
        now = time.time_ns()
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, parent_id = ?, created = ?, updated = ?, "
            "size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), parent_id, now, now, usage.size, usage.inodes, row[0]),
        )
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (row[0],))
        self._write_labels(row[0], labels)
        return Snapshot(row[0], Kind.COMMITTED, self._chain(parent_id))

    def remove(self, key: str) -> tuple[int, Kind]:
        """Delete *key* of any kind; return its (id, kind). Its storage is now garbage.

        NotFound: no *key*. FailedPrecondition: it has children (of any kind)."""
        self._require_write()
        row = self._get(key)
        child = self._conn.execute(
            "SELECT key FROM snapshots WHERE parent_id = ? ORDER BY key LIMIT 1", (row[0],)
        ).fetchone()
        if child is not None:
            # containerd's conformance suite expects the word "remove" in this message.
            raise FailedPrecondition(
                f'snapshot "{key}": cannot remove snapshot with child "{child[0]}"; '
                "remove the children first"
            )
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return row[0], Kind(row[1])

    def update_info(self, info: Info, paths: Sequence[str]) -> Info:
        """Change the labels of snapshot *info.name*; return the new info.

        No *paths*: replace all labels. `labels`: the same. `labels.<k>`: set
        label k from *info* or delete it when *info* lacks it. Name, parent,
        kind and times are never changed. NotFound: no snapshot.
        InvalidArgument: any other path."""
        self._require_write()
        key = info.name
        row = self._get(key)
        labels = self._labels(row[0])
        if not paths:
            labels = dict(info.labels)
        for path in paths:
            if path == "labels":
                labels = dict(info.labels)
            elif path.startswith("labels.") and len(path) > len("labels."):
                label = path.removeprefix("labels.")
                if label in info.labels:
                    labels[label] = info.labels[label]
                else:
                    labels.pop(label, None)
            else:
                raise InvalidArgument(
                    f'snapshot "{key}": cannot update field {path!r}; only "labels" and '
                    '"labels.<key>" can be updated'
                )
        now = time.time_ns()
        self._conn.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (now, row[0]))
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (row[0],))
        self._write_labels(row[0], labels)
        return self._info(key, self._find(key))

    # ------------------------------------------------------------------ helpers

    # Row layout of _find: (id, kind, parent_id, created, updated, size, inodes).
    def _find(self, key: str) -> tuple | None:
        return self._conn.execute(
            "SELECT id, kind, parent_id, created, updated, size, inodes FROM snapshots "
            "WHERE snapshotter = ? AND key = ?",
            (self.snapshotter, key),
        ).fetchone()

    def _get(self, key: str) -> tuple:
        """The `_find` row of *key*. NotFound: no *key*."""
        row = self._find(key)
        if row is None:
            raise NotFound(f'snapshot "{key}": not found')
        return row

    def _snapshot(self, row: tuple) -> Snapshot:
        """The Snapshot of `_find` row *row*, parent chain included."""
        return Snapshot(row[0], Kind(row[1]), self._chain(row[2]))

    def _info(self, key: str, row: tuple | None) -> Info:
        assert row is not None
        parent = ""
        if row[2] is not None:
            parent = self._conn.execute(
                "SELECT key FROM snapshots WHERE id = ?", (row[2],)
            ).fetchone()[0]
        return Info(key, parent, Kind(row[1]), row[3], row[4], self._labels(row[0]))

    def _labels(self, sid: int) -> dict[str, str]:
        return dict(
            self._conn.execute("SELECT name, value FROM labels WHERE snapshot_id = ?", (sid,))
        )

    def _write_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        # As containerd's boltutil.WriteLabels: an empty value means "no such label".
        self._conn.executemany(
            "INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in labels.items() if v != ""],
        )

    def _chain(self, parent_id: int | None) -> tuple[int, ...]:
        """Ids of *parent_id* and its ancestors, nearest first."""
        if parent_id is None:
            return ()
        rows = self._conn.execute(
            "WITH RECURSIVE chain (id, parent_id, depth) AS ("
            "  SELECT id, parent_id, 1 FROM snapshots WHERE id = ?"
            "  UNION ALL"
            "  SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s"
            "  JOIN chain c ON s.id = c.parent_id"
            ") SELECT id FROM chain ORDER BY depth",
            (parent_id,),
        )
        return tuple(r[0] for r in rows)

    def _commit_target(self, name: str, key: str, parent: str) -> tuple[tuple, int | None]:
        """The active row of *key* and the parent id its committed form gets."""
        if self._find(name) is not None:
            raise AlreadyExists(f'snapshot "{name}": already exists')
        row = self._get(key)
        if row[1] != Kind.ACTIVE:
            raise FailedPrecondition(
                f'snapshot "{key}" is {Kind(row[1])}, not active; only active snapshots '
                "can be committed"
            )
        parent_id = row[2]
        if parent:
            prow = self._find(parent)
            if parent_id is not None and (prow is None or prow[0] != parent_id):
                raise InvalidArgument(
                    f'snapshot "{key}": cannot commit onto parent "{parent}"; it already has '
                    "a different parent"
                )
            if prow is None:
                raise NotFound(f'parent snapshot "{parent}": not found')
            if prow[1] != Kind.COMMITTED:
                raise FailedPrecondition(
                    f'parent snapshot "{parent}" is {Kind(prow[1])}, not committed; '
                    "only committed snapshots can be parents"
                )
            parent_id = prow[0]
        return row, parent_id

    def _require_write(self) -> None:
        if not self.writable:
            raise RuntimeError("metadata write inside a read-only transaction (a daemon bug)")
