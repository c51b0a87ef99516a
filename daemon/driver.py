"""The driver interface: where a snapshotter keeps its snapshots on disk, and how they mount.

A driver adds storage only. The service (`daemon/snapshotter.py`) does all
metadata work, enforces every rule of the snapshot model and decides when a
driver method runs; the driver never sees keys, names, labels' meaning or
other drivers. That keeps overlay, erofs and blockfile down to the part in
which they really differ.

Vocabulary:

- *id*: an integer the metadata store hands out per snapshot, stable from
  Prepare/View through Commit until Remove, never reused once committed.
  All storage of a snapshot lives at `path(id)` = `<root>/snapshots/<id>`
  (a directory or a single file, the driver's choice).
- *kind*: ACTIVE (writable, from Prepare), VIEW (read-only, from View),
  COMMITTED (immutable, from Commit; the only kind that can be a parent).
- *parents*: `Snapshot.parent_ids`, the ids of the committed ancestors,
  nearest first. A committed snapshot's storage holds only its own layer
  (overlay, erofs) or a full filesystem (blockfile); `mounts` stacks them.
- *storage on disk without metadata is garbage*: a crash between creating
  storage and committing the metadata leaves it behind, as does a Remove
  whose deletion failed. Cleanup deletes it; `create` replaces it.

One lifecycle, in the order the service calls, and what holds meanwhile:

    create(Snapshot(7, ACTIVE, (3, 1)), labels)
        Prepare (View: kind VIEW), inside its write transaction: keep it fast.
    mounts(Snapshot(7, ACTIVE, (3, 1)))
        Prepare's answer; Mounts asks again later, maybe after a restart.
    usage(Snapshot(7, ACTIVE, (3, 1)))
        Usage of an active or view; no lock held.
    convert(Snapshot(7, ACTIVE, (3, 1))) -> Usage
        Commit, before its transaction (no lock; no Remove of 7 meanwhile).
    sync(7)
        Commit, after convert: storage that the commit will name must be durable.
    committed(Snapshot(7, COMMITTED, (3, 1)))
        Commit, after its transaction.
    remove(7)
        Remove, after its transaction: moves the storage to the trash; a thread
        of the driver deletes it from there, so Remove need not wait for that.
    storage_ids(); discard(5); discard_strays(); then purge()
        Cleanup: storage that no row names, and junk, goes to the trash
        under the write lock; the trash is deleted after it.

Concurrency: calls run on many threads. `create`, `convert`, `committed`,
`remove` and `discard` never overlap for one id; `mounts` (pure: derived
from the Snapshot and the layout, so it works after a restart) and `usage`
(which must tolerate storage vanishing under it) may run at any time.
Errors: raise `shim_framework.errors` classes for what a user can act on
(e.g. FailedPrecondition "mkfs.erofs not found"); an OSError reaches
containerd as "unknown" with its message.

Adding a driver: subclass `Driver`, implement `create`, `mounts`,
`convert` and `usage`, override what differs, and make sure
`daemon/registry.py` names it (erofs and blockfile are listed already:
`daemon/erofs.py` with `ErofsDriver`, `daemon/blockfile.py` with
`BlockfileDriver`). Then add it to `DRIVERS` in
`tests/test_snapshotter_conformance.py`. Test-only hooks (slow commits for
crash tests) live in the service, not in drivers.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import queue
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import attrs

from daemon.model import Mount, Snapshot, Usage
from shim_framework.backend import Probe
from shim_framework.errors import FailedPrecondition
from shim_framework.mounts import unmount_all

log = logging.getLogger("polyshim.snapshotd.driver")


@attrs.frozen
class DriverOptions:
    """Daemon settings a driver may use (from the command line). New fields get defaults."""

    #: Size in bytes of a new writable image (blockfile); None: the driver's default.
    blockfile_size: int | None = None
    #: Extra overlay mount options (containerd's `mount_options`), after ours.
    mount_options: tuple[str, ...] = ()


class Driver(abc.ABC):
    """Storage of one named snapshotter below its own *root* (`<daemon root>/<name>`).

    Subclasses set `name` (the driver name of `--snapshotters`) and may set
    `capabilities`: `"rebase"` if a parentless active may be committed onto
    a parent (containerd 2.2+ CommitSnapshotRequest.parent)."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, root: Path, options: DriverOptions | None = None) -> None:
        self.root = Path(root)
        self.options = options or DriverOptions()
        self.snapshots_dir = self.root / "snapshots"
        self.trash_dir = self.root / "trash"
        for d in (self.root, self.snapshots_dir, self.trash_dir):
            make_dir(d, 0o700, exist_ok=True)
        self.deleter = TrashDeleter(f"snapshotd-{self.name}-deleter")

    @classmethod
    def probe(cls, root: Path) -> Probe:
        """Whether the driver can work here with *root* as its storage (checked at start-up)."""
        return Probe.yes()

    def path(self, sid: int) -> Path:
        """Where the storage of *sid* lives."""
        return self.snapshots_dir / str(sid)

    # ------------------------------------------------------------------ required

    @abc.abstractmethod
    def create(self, snap: Snapshot, labels: Mapping[str, str]) -> None:
        """Create the storage of new active snapshot or view *snap* at `path(snap.id)`.

        Replaces leftovers at that path (garbage, see above). Runs inside the
        write transaction, which rolls back if this raises; keep it fast."""

    @abc.abstractmethod
    def mounts(self, snap: Snapshot) -> list[Mount]:
        """The mounts of active snapshot or view *snap*: writable for ACTIVE, read-only for VIEW.

        Must not change anything: it is asked again long after `create`."""

    @abc.abstractmethod
    def convert(self, snap: Snapshot) -> Usage:
        """Make active *snap* ready to be committed and return the usage to record.

        The metadata still says ACTIVE and may stay so (the commit can fail
        or the process die next), so leave the active usable and make this
        idempotent: write new files aside and rename them into place."""

    @abc.abstractmethod
    def usage(self, snap: Snapshot) -> Usage:
        """Current usage of active snapshot or view *snap*, parents excluded; a view's is 0."""

    # ------------------------------------------------------------------ optional

    def sync(self, sid: int) -> None:
        """Make the storage of *sid* survive a power loss: Commit calls it after `convert`,
        before recording the commit. `create` does not sync (a Prepare per container would
        pay two fsyncs): an active's content is not durable before Commit anyway, and the
        daemon recreates actives and views that a power loss took (see `Snapshotter.restore`).
        """
        fsync(self.path(sid))
        fsync(self.snapshots_dir)

    def committed(self, snap: Snapshot) -> None:  # noqa: B027 (optional hook, default no-op)
        """Commit of *snap* is recorded: free what only the active form needed.

        Best effort: failures are logged, and a crash may skip it, so code
        reading committed storage must tolerate its leftovers. Default: nothing."""

    def storage_ids(self) -> set[int]:
        """Ids that have storage on disk (Cleanup discards those no metadata names)."""
        return {int(name) for name in os.listdir(self.snapshots_dir) if _is_id(name)}

    def discard_strays(self) -> list[str]:
        """Move entries of `snapshots/` that are not ids to the trash; return their names.

        `snapshots/` holds nothing but `<id>` entries; anything else is junk
        (an older layout, a hand-made file). Called by Cleanup under the write lock."""
        strays = [name for name in os.listdir(self.snapshots_dir) if not _is_id(name)]
        for name in strays:
            self._to_trash(self.snapshots_dir / name)
        return strays

    def discard(self, sid: int) -> None:
        """Make the storage of *sid* unreachable at once: unmount what is below it, move it
        to the trash. Fast (no deletion); missing storage is not an error."""
        self._to_trash(self.path(sid))

    def purge(self) -> None:
        """Delete everything in the trash. Failures are logged and retried next time."""
        self.deleter.drain()  # not two deletions of one tree at once
        for entry in os.scandir(self.trash_dir):
            _delete(Path(entry.path))

    def remove(self, sid: int) -> None:
        """Delete the storage of *sid*, whose metadata is gone. Default: to the trash, whose
        deletion `deleter` does in the background."""
        moved = self._to_trash(self.path(sid))
        if moved is not None:
            self.deleter.delete([moved])

    def close(self) -> None:
        """Release what the driver holds (the daemon is stopping). Idempotent; subclasses
        call it. What is still queued for deletion stays in the trash for the next start."""
        self.deleter.close()

    # ------------------------------------------------------------------ helpers

    @classmethod
    def _probe_mount(cls, root: Path, test: Callable[[Path], None], failure: str) -> Probe:
        """Run *test* (a test mount) in a new directory below *root*, deleted afterwards;
        Probe.no(f"{failure}: <error>") if it raises OSError or FailedPrecondition."""
        try:
            root.mkdir(parents=True, exist_ok=True)
            td = Path(tempfile.mkdtemp(prefix=f"{cls.name}-check-", dir=root))
            try:
                test(td)
            finally:
                shutil.rmtree(td, ignore_errors=True)
        except (OSError, FailedPrecondition) as exc:
            return Probe.no(f"{failure}: {exc}")
        return Probe.yes()

    def _clear_leftover(self, sid: int) -> Path:
        """`path(sid)` for `create`, with what a crash left there moved to the trash."""
        path = self.path(sid)
        if os.path.lexists(path):
            log.warning("%s: replacing leftover storage %s (from a crash)", self.name, path)
            self._to_trash(path)
        return path

    def _to_trash(self, path: Path) -> Path | None:
        if not os.path.lexists(path):
            return None
        if path.is_dir() and not path.is_symlink():
            unmount_all(path)
        target = self.trash_dir / f"{path.name}-{secrets.token_hex(4)}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None  # someone else moved it first (a concurrent Cleanup)
        return target


def host_lacks(filesystem: str, missing: str, tools: Sequence[str] = (), package: str = "") -> str:
    """Why this host cannot run a driver: one of *tools* (from Debian *package*) is not on PATH,
    or the kernel lacks *filesystem* (reason: *missing*); "" if neither."""
    if tool := _not_on_path(tools, package):
        return tool
    try:
        filesystems = Path("/proc/filesystems").read_text().split()
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    return "" if filesystem in filesystems else missing


def run(argv: list[str], package: str, timeout: float, ok: tuple[int, ...] = (0,)) -> str:
    """Run tool *argv* (from Debian *package*) without stdin; return its stdout.

    FailedPrecondition: the tool is not on PATH. OSError: no result after
    *timeout* seconds, or an exit status not in *ok* (the error has its output)."""
    if missing := _not_on_path(argv[:1], package):
        raise FailedPrecondition(missing)
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise OSError(errno.ETIMEDOUT, f"{argv[0]}: no result after {timeout}s") from exc
    if result.returncode not in ok:
        output = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise OSError(
            errno.EIO, f"{' '.join(argv)} failed with exit status {result.returncode}: {output}"
        )
    return result.stdout.decode(errors="replace")


def _not_on_path(tools: Sequence[str], package: str) -> str:
    missing = next((tool for tool in tools if shutil.which(tool) is None), None)
    return f"{missing} not found on PATH (apt-get install {package})" if missing else ""


def _is_id(name: str) -> bool:
    return name.isdigit() and name.isascii() and str(int(name)) == name


def make_dir(path: Path, mode: int, *, exist_ok: bool = False) -> None:
    """mkdir with exactly *mode*, whatever the process umask."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not exist_ok or not path.is_dir():
            raise
    os.chmod(path, mode)


def fsync(path: Path | str) -> None:
    """Persist file *path*'s data, or directory *path*'s entries (new or renamed children)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_usage(root: Path) -> Usage:
    """Bytes and inodes below *root*, *root* included, as containerd's `fs.DiskUsage`.

    Each (device, inode) counts once, so hard links are not double counted;
    size is allocated blocks (`st_blocks * 512`), not apparent size. Entries
    that vanish during the walk are skipped; a missing *root* is empty."""
    seen: set[tuple[int, int]] = set()
    size = 0
    todo = [str(root)]
    first = True
    while todo:
        path = todo.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if first:
                return Usage()
            continue
        first = False
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    todo.extend(entry.path for entry in it)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return Usage(size=size, inodes=len(seen))


class TrashDeleter:
    """One thread deleting what went to the trash, so that the call that put it there need
    not wait (deleting a big tree takes as long as writing it).

    Resource handling: owned by the driver; the thread starts with the first deletion.
    `close` lets the deletion in progress finish and stops the thread; what is still queued
    stays in the trash, which the next Cleanup or start-up purges. Errors are logged (see
    `_delete`)."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def delete(self, paths: list[Path]) -> None:
        if not paths:
            return
        with self._idle:
            if self._closed:
                return  # stopping: the trash keeps them
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name,
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._pending += len(paths)
            for path in paths:
                self._queue.put(path)

    def drain(self) -> None:
        """Wait until everything queued so far is deleted (or the deleter is closed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0 or self._closed)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None and not self._closed:
            _delete(path)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def close(self) -> None:
        with self._idle:
            self._closed, thread = True, self._thread
            self._idle.notify_all()
        if thread is not None:
            self._queue.put(None)
            thread.join()


def _delete(path: Path) -> None:
    def onerror(func: object, failed: str, exc_info: tuple) -> None:
        exc = exc_info[1]
        if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
            return  # deleted concurrently
        log.warning("driver: could not delete %s: %s (retried at the next Cleanup)", failed, exc)

    try:
        if path.is_dir() and not path.is_symlink():
            unmount_all(path)
            shutil.rmtree(path, onerror=onerror)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("driver: could not delete %s: %s (retried at the next Cleanup)", path, exc)
